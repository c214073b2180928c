"""A run's life: finished only when it says so, stopped cleanly by SIGINT / SIGTERM, one process
per run directory, caches that heal; and the frictions a new user hit (issue 21, one test per
item, in its order)."""
import argparse
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import finetune_domain
import finetune_multi_domain
import predict
import report
import train_domain
import train_multi_domain
import utils
from conftest import ROOT, tiny_teacher_args
from data_processing import CustomProcessor
from sample_corpus import write_custom_corpus
from test_reliability import run_script, same_weights, stage1_args


def status_of(run):
    return utils.run_status(str(run), need_test=True)["state"]


@pytest.fixture(scope="module")
def stage3_teacher(sample, tmp_path_factory):
    """A tiny stage-3 teacher (4 heads, 4 layers)."""
    out = tmp_path_factory.mktemp("lifecycle") / "teacher"
    assert train_multi_domain.main(tiny_teacher_args(sample, out, 2, "--do_train")) == 0
    return out


def stage4_args(sample, teacher, out, *extra):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir", str(teacher),
            "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "6", "--val_freq",
            "2", "--no_progress", "--do_train", "--do_test", "--output_dir", str(out), *extra]


# 1 + 4: a stopped run is never finished; SIGTERM / SIGINT stop at a step boundary ------------
def test_sigterm_stops_cleanly_and_the_run_is_not_finished_until_resumed(sample, tmp_path):
    full = run_script("train_domain.py", stage1_args(sample, tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert status_of(tmp_path / "full") == "finished"
    cut = tmp_path / "cut"
    stopped = run_script("train_domain.py", stage1_args(sample, cut),
                         {"HRKD_KILL_AT_STEP": "5", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143
    assert "Traceback" not in stopped.stderr
    message = "stopped at step 5 of 8 by SIGTERM; continue with --resume"
    assert [line for line in stopped.stderr.splitlines() if "stopped" in line] == [
        line for line in stopped.stderr.splitlines() if message in line]
    assert message in (cut / "train.log").read_text()
    results = json.loads((cut / "results.json").read_text())
    assert "finished" not in results and results["stopped"]["step"] == 5
    assert utils.run_status(str(cut))["state"] == "incomplete"
    assert utils.describe_status(utils.run_status(str(cut))) == \
        "incomplete: stopped at step 5 of 8"
    assert utils.main(["finished", str(cut)]) == 1 and utils.main(
        ["finished", str(tmp_path / "full"), "--tested"]) == 0
    assert not (cut / ".lock").exists()
    # --skip_finished resumes it; the result is the uninterrupted run's.
    resumed = run_script("train_domain.py", stage1_args(sample, cut) + ["--skip_finished"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming (incomplete: stopped at step 5 of 8)" in resumed.stderr
    assert json.loads((cut / "results.json").read_text()) == \
        json.loads((tmp_path / "full" / "results.json").read_text())
    assert same_weights(tmp_path / "full" / "best_model.bin", cut / "best_model.bin")
    again = run_script("train_domain.py", stage1_args(sample, cut) + ["--skip_finished"])
    assert again.returncode == 0 and "skipped (finished)" in again.stderr


def test_sigint_at_the_first_step_leaves_a_run_that_resume_continues(sample, tmp_path):
    out = tmp_path / "run"
    stopped = run_script("train_domain.py", stage1_args(sample, out),
                         {"HRKD_KILL_AT_STEP": "1", "HRKD_KILL_SIGNAL": "INT"})
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "stopped at step 1 of 8 by SIGINT; continue with --resume" in stopped.stderr
    resumed = run_script("train_domain.py", stage1_args(sample, out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert status_of(out) == "finished"


def test_sigint_during_start_up_leaves_nothing_or_a_resumable_run(sample, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_domain.py"),
                                *stage1_args(sample, out)], stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT)
    deadline = time.time() + 60
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (0, 130) and "Traceback" not in stderr, stderr
    if process.returncode == 130 and out.exists():
        assert (out / "last_checkpoint.pt").exists()
        resumed = run_script("train_domain.py", stage1_args(sample, out) + ["--resume"])
        assert resumed.returncode == 0, resumed.stderr
    elif process.returncode == 130:  # stopped before any step: nothing blocks a plain rerun
        rerun = run_script("train_domain.py", stage1_args(sample, out))
        assert rerun.returncode == 0, rerun.stderr


def test_skip_finished_refuses_a_run_trained_with_other_settings(sample, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_domain.main(stage1_args(sample, out, steps=4)) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    # the same recipe, another machine's paths and switches: skipped
    same = stage1_args(sample, out, steps=4) + ["--skip_finished", "--eval_batch_size", "3"]
    assert train_domain.main(same) == 0
    assert "skipped (finished)" in capsys.readouterr().err
    # another length or rate: one line naming the folder and what changed, the run untouched
    other = stage1_args(sample, out, steps=6) + ["--skip_finished", "--learning_rate", "2e-3"]
    assert train_domain.main(other) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {out} was trained with other settings (learning_rate 0.001 -> "
                     "0.002, max_steps 4 -> 6); --overwrite retrains it, or choose another "
                     "--output_dir"]
    assert (out / "results.json").read_text() == before


def test_report_and_launcher_trust_only_the_marker(sample, tmp_path):
    full = tmp_path / "train_domain" / "amazon" / "books" / "seed42"
    assert run_script("train_domain.py", stage1_args(sample, full)).returncode == 0
    stopped = tmp_path / "train_domain" / "amazon" / "dvd" / "seed42"
    args = stage1_args(sample, stopped)
    args[args.index("--domain") + 1] = "dvd"
    assert run_script("train_domain.py", args, {"HRKD_KILL_AT_STEP": "3",
                                                "HRKD_KILL_SIGNAL": "TERM"}).returncode == 143
    results = json.loads((stopped / "results.json").read_text())
    results["test"] = {"per_domain": {"dvd": 0.99}}  # figures of a run that never finished
    (stopped / "results.json").write_text(json.dumps(results))
    table = report.collect(str(tmp_path), "amazon")["Single-domain teacher"]
    assert len(table["books"]) == 1 and table["dvd"] == []
    assert report.incomplete_runs(str(tmp_path)) == [
        ["train_domain/amazon/dvd/seed42", "incomplete: stopped at step 3 of 8"]]
    text = report.report(str(tmp_path), str(tmp_path / "report"), ["amazon"])
    assert "train_domain/amazon/dvd/seed42" in text and "stopped at step 3 of 8" in text


# 2: a head count the attention loss cannot compare is refused before anything is written ------
@pytest.mark.parametrize("stage", ["finetune_domain", "finetune_multi_domain"])
def test_student_heads_must_match_the_teacher(sample, stage3_teacher, tmp_path, stage, capsys):
    out = tmp_path / "student"
    args = stage4_args(sample, stage3_teacher, out)  # default student: 12 heads; teacher: 4
    main = finetune_multi_domain.main
    if stage == "finetune_domain":
        main = finetune_domain.main
        args[args.index("--teacher_dir") + 1] = str(stage3_teacher / "best_model.bin")
        args += ["--domain", "books", "--vocab_file", sample["vocab"]]
    assert main(args) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: the student has 12 attention heads and the teacher 4")
    assert "give the student 4 heads" in error
    assert not out.exists()


# 3: a corrupt feature cache is named, deleted and rebuilt ------------------------------------
@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04 torn"])
def test_bad_feature_cache_files_are_named_and_rebuilt(sample, tmp_path, content, caplog):
    from data_processing import load_task_features
    from tokenization import WordPieceTokenizer
    tokenizer = WordPieceTokenizer(sample["vocab"])
    cache = tmp_path / "cache"
    first = load_task_features("amazon", sample["amazon"], ["books"], tokenizer, 32,
                               cache_dir=str(cache))
    [name] = os.listdir(cache)
    (cache / name).write_bytes(content)
    with caplog.at_level("WARNING", logger="hrkd"):
        again = load_task_features("amazon", sample["amazon"], ["books"], tokenizer, 32,
                                   cache_dir=str(cache))
    assert f"{cache / name}: feature cache unreadable" in caplog.text
    assert torch.equal(first["books"]["train"]["input_ids"], again["books"]["train"]["input_ids"])
    assert torch.load(cache / name, weights_only=True)["dev"]["labels"].shape[0] > 0


@pytest.mark.parametrize("content", [None])
def test_corrupt_feature_cache_is_rebuilt(sample, tmp_path, content):
    cache = tmp_path / "cache"
    first = run_script("train_domain.py", stage1_args(sample, tmp_path / "a") +
                       ["--cache_dir", str(cache)])
    assert first.returncode == 0, first.stderr
    [name] = os.listdir(cache)
    path = cache / name
    if content is None:  # a truncated archive
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    second = run_script("train_domain.py", stage1_args(sample, tmp_path / "b") +
                        ["--cache_dir", str(cache)])
    assert second.returncode == 0, second.stderr
    assert f"{path}: feature cache unreadable" in second.stderr and "rebuilding" in second.stderr
    assert "Traceback" not in second.stderr
    assert torch.load(path, weights_only=True)["train"]["input_ids"].shape[0] > 0
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == \
        json.loads((tmp_path / "b" / "results.json").read_text())


# 5: one process per run directory -----------------------------------------------------------
def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                              "started": "2026-12-01T00:00:00"}))


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_a_second_run_into_a_locked_directory_is_refused(sample, tmp_path, extra):
    out = tmp_path / "run"
    write_lock(out, os.getpid())  # this test's process: alive
    result = run_script("train_domain.py", stage1_args(sample, out) + extra)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in error
    assert os.listdir(out) == [".lock"]


def test_a_stale_lock_is_taken_over(sample, tmp_path):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    write_lock(out, int(dead))
    result = run_script("train_domain.py", stage1_args(sample, out))
    assert result.returncode == 0, result.stderr
    assert "taking over a stale lock" in result.stderr and f"pid {dead}" in result.stderr
    assert not (out / ".lock").exists() and status_of(out) == "finished"


def test_lock_is_held_while_the_run_trains(sample, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    args = stage1_args(sample, out)
    args[args.index("--max_steps") + 1] = "400"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_domain.py"), *args],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.time() + 60
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == process.pid
        assert utils.run_status(str(out))["state"] == "running"
        assert utils.describe_status(utils.run_status(str(out))).startswith("running")
        second = run_script("train_domain.py", stage1_args(sample, out) + ["--overwrite"])
        assert second.returncode == 1 and f"in use by pid {process.pid}" in second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    assert process.returncode == 143


# 6: predict.py --file reads the project's own formats ---------------------------------------
@pytest.fixture(scope="module")
def single_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    assert train_domain.main(tiny_teacher_args(sample, out, 2, "--do_train")) == 0
    return out


@pytest.mark.parametrize("extension", CustomProcessor.EXTENSIONS)
def test_predict_reads_data_files_by_extension(sample, single_run, tmp_path, extension, capsys):
    data = write_custom_corpus(sample["amazon"], str(tmp_path / "data"), extension, ("books",))
    path = os.path.join(data, "books", f"test.{extension}")
    expected = [text for text, _, _, _ in CustomProcessor(data)._rows("books", "test")]
    assert predict.main([str(single_run), "--file", path, "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in records] == expected
    assert all("text_b" not in r for r in records)  # the label column is not a second text


def test_predict_reads_mnli_pairs_and_review_files(sample, single_run, capsys):
    mnli = os.path.join(sample["mnli"], "dev_matched.tsv")
    assert predict.main([str(single_run), "--file", mnli, "--format", "jsonl"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with open(mnli, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    assert [(r["text"], r["text_b"]) for r in records] == [(row[8], row[9]) for row in rows]
    review = os.path.join(sample["amazon"], "books", "positive.review")
    assert predict.main([str(single_run), "--file", review]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("text\t") and "<review_text>" not in "".join(lines)


# 7: reproduce_amazon.sh without a step, with help, as a dry run --------------------------------
@pytest.mark.parametrize("argv", [[], ["help"], ["-h"], ["--help"]])
def test_reproduce_without_a_step_prints_its_steps_and_creates_nothing(tmp_path, argv):
    out = tmp_path / "runs"
    result = subprocess.run(["bash", "reproduce_amazon.sh", *argv], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, OUT_ROOT=str(out)),
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "table     79 minutes" in result.stdout and "fewshot" in result.stdout
    assert not out.exists()


def test_reproduce_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, OUT_ROOT=str(out), PYTHON="echo")
    for step in ("tune", "table"):
        result = subprocess.run(["bash", "reproduce_amazon.sh", step], capture_output=True,
                                text=True, cwd=ROOT, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "train_domain.py" in result.stdout
    assert not out.exists()


# 8: the custom-data commands of the README ----------------------------------------------------
def readme_block(marker):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ")


def test_readme_custom_commands_run_as_written(tmp_path):
    script = readme_block("custom-tiny").replace("my_domains", str(tmp_path / "my_domains"))
    env = dict(os.environ, OUT_ROOT=str(tmp_path / "runs"), PYTHON=sys.executable,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("train_domain/custom/books", "finetune_domain/custom/books",
                  "train_multi_domain/custom", "finetune_multi_domain/custom/hrkd"):
        assert status_of(tmp_path / "runs" / stage / "seed42") == "finished", stage
    real = readme_block("custom-real").replace("tickets", str(tmp_path / "my_domains" /
                                                              "custom"))
    dry = subprocess.run(["bash", "-euo", "pipefail", "-c", real], capture_output=True,
                         text=True, cwd=ROOT, env=dict(env, PYTHON="echo"), timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "--init_checkpoint all-MiniLM-L6-v2" in dry.stdout


def test_missing_checkpoint_is_named_before_the_vocabulary(sample, tmp_path):
    out = tmp_path / "run"
    args = [a for a in stage1_args(sample, out)]
    del args[args.index("--vocab_file"):args.index("--vocab_file") + 2]
    result = run_script("train_domain.py", args + ["--init_checkpoint",
                                                   "pretrained_ckpt/bert-base-uncased"])
    assert result.returncode == 1
    assert "--init_checkpoint pretrained_ckpt/bert-base-uncased: not found" in result.stderr
    assert "vocab.txt" not in result.stderr and not out.exists()


def test_custom_task_without_its_folder_names_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CUSTOM_DIR"}
    result = subprocess.run(["bash", "train_domain.sh"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(env, TASKS="custom", PYTHON="echo",
                                               OUT_ROOT=str(tmp_path)), timeout=30)
    assert result.returncode == 1
    assert "CUSTOM_DIR is not set" in result.stderr and result.stdout == ""


# 9: paths with spaces survive the launchers ----------------------------------------------------
def test_launchers_keep_paths_with_spaces_whole(sample, tmp_path):
    recorder = tmp_path / "python"
    recorder.write_text(f"#!{sys.executable}\n"
                        "import json, os, runpy, sys\n"
                        "if sys.argv[1] in ('data_processing.py', 'variants.py', 'utils.py'):\n"
                        "    sys.path.insert(0, os.getcwd()); sys.argv = sys.argv[1:]\n"
                        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                        "else:\n"
                        "    print(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    vocab, cache = str(tmp_path / "my vocab.txt"), str(tmp_path / "feature cache")
    env = dict(os.environ, PYTHON=str(recorder), TASKS="amazon", AMAZON_DIR=sample["amazon"],
               VOCAB_FILE=vocab, CACHE_DIR=cache, OUT_ROOT=str(tmp_path / "runs"),
               STUDENT_INIT_LAYERS="1 2")
    for launcher in ("train_domain.sh", "finetune_domain.sh", "train_multi_domain.sh",
                     "finetune_multi_domain.sh"):
        result = subprocess.run(["bash", launcher], capture_output=True, text=True, cwd=ROOT,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        for line in result.stdout.splitlines():
            argv = json.loads(line)
            assert argv[argv.index("--vocab_file") + 1] == vocab
            assert argv[argv.index("--cache_dir") + 1] == cache
            if "--student_init_layers" in argv:
                at = argv.index("--student_init_layers")
                assert argv[at + 1:at + 3] == ["1", "2"]


# 10: the fit domain is the task's; --output_dir naming a file ---------------------------------
def test_multi_domain_stages_default_to_the_tasks_fit_domain(sample, stage3_teacher, tmp_path):
    config = json.loads((stage3_teacher / "config.json").read_text())
    assert config["args"]["domain"] == "books"  # tiny_teacher_args passes it; now optional
    out = tmp_path / "s3"
    args = tiny_teacher_args(sample, out, 2, "--do_train")
    del args[args.index("--domain"):args.index("--domain") + 2]
    assert train_multi_domain.main(args) == 0
    assert json.loads((out / "config.json").read_text())["args"]["domain"] == "books"
    s4 = tmp_path / "s4"
    assert finetune_multi_domain.main(stage4_args(sample, out, s4, "--student_config",
                                                  "tiny_student")) == 0
    assert json.loads((s4 / "config.json").read_text())["args"]["domain"] == "books"


def test_output_dir_that_is_a_file_is_one_line(sample, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    result = run_script("train_domain.py", stage1_args(sample, target))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --output_dir {target}: a file, not a directory"


# 11: --help shows every default once --------------------------------------------------------------
@pytest.mark.parametrize("script", ["train_domain", "finetune_domain", "train_multi_domain",
                                    "finetune_multi_domain", "train_meta_teacher",
                                    "finetune_metakd", "export", "predict", "report"])
def test_help_shows_each_default_once(script, capsys):
    module = __import__(script)
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    if parser is None:
        with pytest.raises(SystemExit):
            module.main(["--help"])
        text = capsys.readouterr().out
    else:
        text = parser.format_help()
        for action in parser._actions:
            if (action.option_strings and action.default not in (None, False, True)
                    and not action.required and action.default != argparse.SUPPRESS):
                formatted = parser._get_formatter()._format_action(action)
                assert "default" in formatted.lower(), action.option_strings
    flat = re.sub(r"\s+", " ", text)
    assert not re.search(r"\(default: [^)]*\) \(default:", flat), flat
    # a --no_x flag never reads "(default: True)" (as if it were on); it says what it does
    assert not re.search(r"--no_\w+ \(default: (True|False)\)", flat), flat
    if parser is not None:
        for action in parser._actions:
            if any(o.startswith("--no_") for o in action.option_strings):
                assert action.help, action.option_strings
    assert "default: None" not in flat
    if script in ("train_domain", "finetune_multi_domain"):
        assert "tiny_teacher" in flat  # --model_config / --student_config list the presets
    if script == "finetune_multi_domain":
        for flag in ("--learning_rate", "--num_train_epochs", "--max_seq_length", "--amp",
                     "--temperature"):
            assert re.search(re.escape(flag) + r" \S+ (?:(?! --).)*?\(default: ", flat), flag
    if script == "export":
        assert re.search(r"--out OUT output folder \(required\)", flat)


# 12: the smaller ones -------------------------------------------------------------------------------
def test_feature_cache_defaults_outside_the_data_folder(sample, tmp_path, monkeypatch):
    import shutil
    data = tmp_path / "amazon"
    shutil.copytree(sample["amazon"], data, ignore=shutil.ignore_patterns("cache"))
    cache = tmp_path / "user_cache"
    monkeypatch.setenv("HRKD_CACHE_DIR", str(cache))
    args = stage1_args(sample, tmp_path / "run")
    args[args.index("--data_dir") + 1] = str(data)
    result = run_script("train_domain.py", args)
    assert result.returncode == 0, result.stderr
    assert not (data / "cache").exists() and len(os.listdir(cache)) == 1
    monkeypatch.delenv("HRKD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert utils.default_cache_dir() == str(tmp_path / "xdg" / "hrkd")


def test_random_bert_base_warns(caplog):
    import objectives
    with caplog.at_level("WARNING", logger="hrkd"):
        objectives.build_teacher("bert_base", None, 100, 2, 128)
    assert "starts from random weights" in caplog.text and "bert-base-uncased" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hrkd"):
        objectives.build_teacher("tiny_teacher", None, 100, 2, 32)
    assert "random weights" not in caplog.text


def test_step_counts_are_pluralised(sample, tmp_path):
    args = stage1_args(sample, tmp_path / "run")
    args[args.index("--max_steps") + 1] = "1"
    result = run_script("train_domain.py", args)
    assert result.returncode == 0, result.stderr
    assert ": 1 step (" in result.stderr and "1 domain x 1 process" in result.stderr
    assert "1 steps" not in result.stderr


@pytest.fixture(scope="module")
def multi_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_multi") / "run"
    assert train_multi_domain.main(tiny_teacher_args(sample, out, 2, "--do_train")) == 0
    return out


def test_predict_domain_messages_and_per_domain_checkpoints(multi_run, capsys):
    assert predict.main([str(multi_run), "--domain", "nope", "a text"]) == 1
    error = capsys.readouterr().err
    assert "--domain nope: not a domain of" in error and "books, dvd" in error
    assert predict.main([str(multi_run), "a text"]) == 1
    assert "pass --domain, one of books" in capsys.readouterr().err
    assert predict.main([str(multi_run / "best_model_dvd.bin"), "a text"]) == 0
    assert capsys.readouterr().out.count("\n") == 2


def test_unused_label_and_small_fit_domain_warn(sample, tmp_path):
    data = write_custom_corpus(sample["amazon"], str(tmp_path / "data"), "tsv",
                               ("books", "dvd"))
    with open(os.path.join(data, "labels.txt"), "w", encoding="utf-8") as handle:
        handle.write("negative\npositive\nmixed\n")
    args = ["--task", "custom", "--data_dir", data, "--vocab_file", sample["vocab"],
            "--model_config", "tiny_teacher", "--max_seq_length", "16", "--batch_size", "4",
            "--max_steps", "1", "--no_progress", "--do_train"]
    sizes = {d: len(CustomProcessor(data)._rows(d, "train")) for d in ("books", "dvd")}
    small = min(sizes, key=sizes.get)
    if sizes["books"] == sizes["dvd"]:  # make one domain smaller
        path = os.path.join(data, "dvd", "train.tsv")
        lines = open(path, encoding="utf-8").read().splitlines(keepends=True)
        open(path, "w", encoding="utf-8").write("".join(lines[:-3]))
        small = "dvd"
    result = run_script("train_multi_domain.py", args + ["--domain", small, "--output_dir",
                                                         str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr
    assert "label(s) mixed have no training example" in result.stderr
    assert f"fit domain {small} has" in result.stderr and "fewer than" in result.stderr


def test_collect_copies_only_finished_runs(sample, tmp_path):
    runs = tmp_path / "runs"
    done = runs / "train_domain" / "amazon" / "books" / "seed42"
    assert run_script("train_domain.py", stage1_args(sample, done)).returncode == 0
    stopped = runs / "train_domain" / "amazon" / "dvd" / "seed42"
    stopped.mkdir(parents=True)
    (stopped / "results.json").write_text("{}")
    (stopped / "config.json").write_text("{}")
    assert utils.collect_finished(str(runs), str(tmp_path / "kept")) == [
        "train_domain/amazon/books/seed42"]
    kept = tmp_path / "kept" / "train_domain" / "amazon" / "books" / "seed42"
    assert sorted(os.listdir(kept)) == ["config.json", "results.json", "timing.json"]
    assert report.collect(str(tmp_path / "kept"), "amazon")["Single-domain teacher"]["books"]
