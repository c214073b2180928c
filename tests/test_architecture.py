"""The layering promises of the library, checked as a reader would with grep and python -c."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

STAGE_SCRIPTS = {"train_domain", "finetune_domain", "train_multi_domain", "finetune_multi_domain",
                 "train_meta_teacher", "finetune_metakd"}
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def project_imports(module):
    """The project modules ``module`` imports anywhere in its text (type-only imports too)."""
    return set(imported_modules(os.path.join(ROOT, module + ".py"))) & set(MODULES)


def test_no_import_circle_not_even_for_types():
    """No two library modules import each other, not even under TYPE_CHECKING: the lower module
    names what it needs of the higher one by a Protocol (objectives.StepWeighting)."""
    circles = sorted({tuple(sorted((a, b))) for a in MODULES for b in project_imports(a)
                      if a != b and a in project_imports(b)})
    assert not circles, circles


def test_no_module_or_tool_imports_a_stage_script():
    for module in MODULES:
        imports = set(imported_modules(os.path.join(ROOT, module + ".py")))
        assert not imports & STAGE_SCRIPTS, f"{module}.py imports {imports & STAGE_SCRIPTS}"


def run_python(code: str):
    """``code`` in a fresh interpreter at the repository root; its failure is the test's."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_each_module_imports_alone():
    """A fresh interpreter per module (all started at once): no import circle, no order
    dependence."""
    runs = {module: subprocess.Popen([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for module in MODULES}
    failures = {}
    for module, process in runs.items():
        _, err = process.communicate(timeout=300)
        if process.returncode:
            failures[module] = err.strip().splitlines()[-1]
    assert not failures, failures


def test_tools_that_write_text_do_not_import_torch():
    code = ("import sys, utils, variants, data_processing, tokenization, sample_corpus, "
            "download, plan; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    run_python(code)


def test_every_weighting_strategy_has_a_variant():
    from weighting import WEIGHTINGS
    from variants import VARIANTS
    named = {flag.split()[1] for v in VARIANTS.values()
             for flag in [v.flags[v.flags.find("--domain_weighting"):]] if "--domain_weighting" in v.flags}
    assert set(WEIGHTINGS) - {"graph"} == named  # graph is the default of every other variant


def test_stage_scripts_are_thin():
    for script in STAGE_SCRIPTS:
        lines = open(os.path.join(ROOT, script + ".py"), encoding="utf-8").read().count("\n")
        assert lines <= 150, f"{script}.py has {lines} lines"


def test_stage_scripts_do_not_import_dynamo():
    """torch._dynamo costs about two seconds of every process start; only --compile needs it."""
    code = ("import sys, train_domain, finetune_domain, train_multi_domain, "
            "finetune_multi_domain, teacher_cache; "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'")
    run_python(code)


def test_one_concept_per_module_and_arrows_down():
    """The tokenizer, the demo corpus and the weighting strategies live in modules of their own:
    the readers do not load the demo's generator, the losses do not load the strategies (which
    build on them), and no library module needs the generator at all."""
    library = [m for m in MODULES if m not in STAGE_SCRIPTS | {"sample_corpus", "bench"}]
    code = ("import sys, importlib\n"
            "import objectives\n"
            "assert 'weighting' not in sys.modules, 'objectives imports weighting'\n"
            "import data_processing\n"
            "assert 'sample_corpus' not in sys.modules, 'data_processing imports the generator'\n"
            f"for name in {library!r}:\n"
            "    importlib.import_module(name)\n"
            "assert 'sample_corpus' not in sys.modules, 'a library module imports the generator'\n")
    run_python(code)
    tokenizer_imports = set(imported_modules(os.path.join(ROOT, "tokenization.py")))
    assert not tokenizer_imports & set(MODULES), "tokenization.py imports a project module"
