"""Smoke runs of stages 1 and 2 on the generated sample, then --do_test on what they saved."""
import json
import os

import pytest
import torch

import finetune_domain
import train_domain
from conftest import tiny_teacher_args
from modeling import model_from_checkpoint

COMMON = ["--task", "amazon", "--max_seq_length", "32", "--batch_size", "8",
          "--eval_batch_size", "32", "--val_freq", "3", "--no_progress"]


def stage1_args(sample, out, *extra):
    return COMMON + ["--data_dir", sample["amazon"], "--domain", "dvd", "--vocab_file",
                     sample["vocab"], "--model_config", "tiny_teacher", "--max_steps", "5",
                     "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def teacher_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "teacher_dvd"
    assert train_domain.main(stage1_args(sample, out, "--do_train")) == 0
    return out


def test_stage1_writes_run_directory(teacher_run):
    for name in ("config.json", "train.log", "best_model.bin", "last_checkpoint.pt",
                 "results.json", "vocab.txt", "tensorboard"):
        assert os.path.exists(teacher_run / name), name
    config = json.load(open(teacher_run / "config.json"))
    assert config["args"]["model_config"] == "tiny_teacher" and "git_commit" in config
    results = json.load(open(teacher_run / "results.json"))
    assert results["dev"]["last_step"] == 5
    model = model_from_checkpoint(str(teacher_run / "best_model.bin"))
    assert model.config.num_hidden_layers == 4 and model.num_domains is None


def test_stage1_test_on_saved_checkpoint(sample, teacher_run):
    assert train_domain.main(stage1_args(sample, teacher_run, "--do_test")) == 0
    results = json.load(open(teacher_run / "results.json"))
    assert 0.0 <= results["test"]["per_domain"]["dvd"] <= 1.0
    assert "dev" in results  # testing keeps the training section


def test_existing_run_directory_is_not_overwritten(sample, teacher_run, capsys):
    before = os.path.getmtime(teacher_run / "best_model.bin")
    assert train_domain.main(stage1_args(sample, teacher_run, "--do_train")) == 1
    assert "run directory exists" in capsys.readouterr().err
    assert os.path.getmtime(teacher_run / "best_model.bin") == before


def test_stage2_distils_and_tests(sample, teacher_run, tmp_path):
    out = tmp_path / "student_dvd"
    args = COMMON + ["--data_dir", sample["amazon"], "--domain", "dvd", "--teacher_dir",
                     str(teacher_run), "--student_config", "tiny_student", "--max_steps", "4",
                     "--output_dir", str(out)]
    assert finetune_domain.main(args + ["--do_train"]) == 0
    assert finetune_domain.main(args + ["--do_test"]) == 0
    results = json.load(open(out / "results.json"))
    assert set(results["test"]["per_domain"]) == {"dvd"}
    student = model_from_checkpoint(str(out / "best_model.bin"))
    assert student.fit_size == 64 and student.config.hidden_size == 32
    saved = torch.load(out / "best_model.bin", weights_only=True)
    assert saved["teacher"].endswith("best_model.bin")


def test_bad_flag_values_fail_before_writing(sample, tmp_path, capsys):
    out = tmp_path / "never"
    assert train_domain.main(stage1_args(sample, out, "--do_train", "--train_ratio", "1.5")) == 1
    assert "--train_ratio must be in (0, 1]" in capsys.readouterr().err
    assert train_domain.main(stage1_args(sample, out, "--do_train", "--max_seq_length",
                                         "512")) == 1
    assert "max_position_embeddings" in capsys.readouterr().err
    assert not out.exists()


def test_several_domains_in_one_process_equal_separate_runs(sample, tmp_path):
    """Stages 1-2 train each --domain in turn in one process (the launchers save a start-up per
    domain); each run is the one a process of its own makes."""
    import json
    import torch
    together = tiny_teacher_args(sample, tmp_path / "together" / "{domain}", 3, "--do_train",
                                 "--do_test")
    together[together.index("--domain") + 1: together.index("--domain") + 2] = ["books", "dvd"]
    assert train_domain.main(together) == 0
    for domain in ("books", "dvd"):
        alone = tiny_teacher_args(sample, tmp_path / "alone" / domain, 3, "--do_train",
                                  "--do_test", domain=domain)
        assert train_domain.main(alone) == 0
        read = lambda kind: json.load(open(tmp_path / kind / domain / "results.json"))
        assert read("together") == read("alone")
        weights = [torch.load(tmp_path / kind / domain / "best_model.bin",
                              weights_only=True)["state_dict"] for kind in ("together", "alone")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_several_domains_need_a_domain_placeholder(sample, tmp_path):
    args = tiny_teacher_args(sample, tmp_path / "run", 2, "--do_train")
    args[args.index("--domain") + 1: args.index("--domain") + 2] = ["books", "dvd"]
    assert train_domain.main(args) == 1
    assert not (tmp_path / "run").exists()


def test_several_variants_in_one_process_equal_separate_runs(sample, tmp_path):
    """Stage 4 runs each --variant in turn in one process (the launcher saves a start-up, the
    imports and the teachers' loading per variant); each run is the one its flags make alone."""
    import json
    import torch
    import finetune_multi_domain
    import train_multi_domain
    from variants import VARIANTS
    teacher = tmp_path / "teacher"
    assert train_multi_domain.main(tiny_teacher_args(sample, teacher, 2, "--do_train")) == 0

    def args(out, *extra):
        return ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir",
                str(teacher), "--student_config", "tiny_student", "--max_seq_length", "32",
                "--batch_size", "4", "--max_steps", "3", "--val_freq", "3", "--no_progress",
                "--do_train", "--do_test", "--output_dir", str(out), *extra]

    names = ["hrkd", "no_graph"]
    assert finetune_multi_domain.main(args(tmp_path / "together" / "{variant}", "--variant",
                                           *names)) == 0
    for name in names:
        assert finetune_multi_domain.main(args(tmp_path / "alone" / name,
                                               *VARIANTS[name].flags.split())) == 0
        read = lambda kind: json.load(open(tmp_path / kind / name / "results.json"))
        assert read("together") == read("alone")
        weights = [torch.load(tmp_path / kind / name / "last_checkpoint.pt",
                              weights_only=True)["model"] for kind in ("together", "alone")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    config = json.load(open(tmp_path / "together" / "no_graph" / "config.json"))["args"]
    assert config["use_graph"] is False and config["variant"] == ["no_graph"]
    assert finetune_multi_domain.main(args(tmp_path / "flat", "--variant", *names)) == 1
