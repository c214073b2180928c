"""Golden first steps: each stage's loss terms at optimisation steps 1-3, pinned to 1e-6.

Fixed tiny configs, the generated sample, seed 42, run in this process through each stage's
``main`` (the same path as the launchers). A refactor that changes any number fails here.
The values were recorded from the code before the library refactor (issue 11).
"""
import pytest

import training
from conftest import tiny_teacher_args


def losses_of_first_steps(monkeypatch, main, argv, steps=3):
    """{step: {loss term: value}} of the first ``steps`` training steps of ``main(argv)``."""
    recorded = {}
    original = training._log_scalars

    def record(writer, prefix, values, step):
        if prefix == "train" and step <= steps:
            recorded[step] = {k: float(v) for k, v in values.items() if k != "lr"}
        return original(writer, prefix, values, step)

    monkeypatch.setattr(training, "_log_scalars", record)
    try:
        assert main(argv) == 0
    finally:
        monkeypatch.undo()
    return recorded


def student_argv(sample, teacher, out, *extra):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
            "--vocab_file", sample["vocab"], "--teacher_dir", str(teacher), "--student_config",
            "tiny_student", "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "3",
            "--val_freq", "3", "--learning_rate", "1e-3", "--no_progress", "--do_train",
            "--output_dir", str(out), *extra]


def assert_golden(recorded, golden):
    assert sorted(recorded) == sorted(golden)
    for step, terms in golden.items():
        assert recorded[step].keys() == terms.keys(), step
        for name, value in terms.items():
            assert recorded[step][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, name)


GOLDEN = {
    "train_domain": {
        1: {"loss": 0.6848403215408325},
        2: {"loss": 0.6204547882080078},
        3: {"loss": 0.5759641528129578},
    },
    "train_multi_domain": {
        1: {"loss": 2.7776992321014404, "ce_0": 0.6803267598152161, "ce_1": 0.6939563155174255, "ce_2": 0.7162471413612366, "ce_3": 0.687169075012207},
        2: {"loss": 2.722614049911499, "ce_0": 0.65171879529953, "ce_1": 0.6955203413963318, "ce_2": 0.6888914704322815, "ce_3": 0.6864833235740662},
        3: {"loss": 2.710204601287842, "ce_0": 0.6273507475852966, "ce_1": 0.7040703296661377, "ce_2": 0.6906490921974182, "ce_3": 0.6881345510482788},
    },
    "finetune_domain": {
        1: {"loss": 3.407341957092285, "hidden_loss": 3.0613608360290527, "pred_loss": 0.34598103165626526},
        2: {"loss": 3.339811325073242, "hidden_loss": 2.994258403778076, "pred_loss": 0.345552921295166},
        3: {"loss": 3.296647548675537, "hidden_loss": 2.9517931938171387, "pred_loss": 0.3448544144630432},
    },
    "hrkd": {
        1: {"loss": 3.361989974975586, "hidden_loss": 3.0154287815093994, "pred_loss": 0.3465612530708313},
        2: {"loss": 3.2936747074127197, "hidden_loss": 2.947333335876465, "pred_loss": 0.34634146094322205},
        3: {"loss": 3.2531466484069824, "hidden_loss": 2.906959056854248, "pred_loss": 0.346187561750412},
    },
    "no_graph": {
        1: {"loss": 13.453516960144043, "hidden_loss": 12.067195892333984, "pred_loss": 1.3863208293914795},
        2: {"loss": 13.171126365661621, "hidden_loss": 11.785717010498047, "pred_loss": 1.3854092359542847},
        3: {"loss": 13.008285522460938, "hidden_loss": 11.623414993286133, "pred_loss": 1.3848707675933838},
    },
    "meta": {
        1: {"meta_loss": 13.447593688964844, "loss": 3.363859176635742, "hidden_loss": 3.017294406890869, "pred_loss": 0.34656473994255066},
        2: {"meta_loss": 13.175094604492188, "loss": 3.294774055480957, "hidden_loss": 2.9484424591064453, "pred_loss": 0.3463315963745117},
        3: {"meta_loss": 12.986934661865234, "loss": 3.2535300254821777, "hidden_loss": 2.907294988632202, "pred_loss": 0.3462350368499756},
    },
}


@pytest.fixture(scope="module")
def golden_runs(sample, tmp_path_factory):
    """Every stage's first three steps, teachers first (stage 2 and 4 distil them)."""
    import train_domain
    import train_multi_domain
    import finetune_domain
    import finetune_multi_domain
    root = tmp_path_factory.mktemp("golden")
    patch = pytest.MonkeyPatch()
    lr = ["--learning_rate", "1e-3", "--val_freq", "3"]
    runs = {
        "train_domain": losses_of_first_steps(patch, train_domain.main, tiny_teacher_args(
            sample, root / "t1", 3, "--do_train", *lr, batch_size=4)),
        "train_multi_domain": losses_of_first_steps(patch, train_multi_domain.main,
                                                    tiny_teacher_args(sample, root / "t3", 3,
                                                                      "--do_train", *lr,
                                                                      batch_size=4)),
    }
    runs["finetune_domain"] = losses_of_first_steps(
        patch, finetune_domain.main, student_argv(sample, root / "t1", root / "s2"))
    for variant, flags in (("hrkd", []), ("no_graph", ["--no_use_graph"]),
                           ("meta", ["--domain_weighting", "meta", "--meta_lr", "1e-2"])):
        runs[variant] = losses_of_first_steps(
            patch, finetune_multi_domain.main,
            student_argv(sample, root / "t3", root / variant, *flags))
    patch.undo()
    return runs


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_first_three_steps_are_pinned(golden_runs, name):
    assert_golden(golden_runs[name], GOLDEN[name])
