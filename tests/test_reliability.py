"""Resume after SIGKILL, bad input, numerical faults, torchrun (DDP on gloo)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import runtime
import training
import utils
from conftest import ROOT, tiny_teacher_args

PYTHON = sys.executable


def run_script(script, args, env_extra=None, timeout=240):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([PYTHON, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def stage1_args(sample, out, steps=8):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
            "--vocab_file", sample["vocab"], "--model_config", "tiny_teacher",
            "--max_seq_length", "32", "--batch_size", "8", "--max_steps", str(steps),
            "--val_freq", "2", "--learning_rate", "1e-3", "--no_progress", "--output_dir",
            str(out), "--do_train", "--do_test"]


def same_weights(path_a, path_b):
    a = torch.load(path_a, weights_only=True)["state_dict"]
    b = torch.load(path_b, weights_only=True)["state_dict"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_matches_uninterrupted_run(sample, tmp_path):
    full = run_script("train_domain.py", stage1_args(sample, tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    killed = run_script("train_domain.py", stage1_args(sample, tmp_path / "cut"),
                        {"HRKD_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    saved = torch.load(tmp_path / "cut" / "last_checkpoint.pt", weights_only=True)
    assert saved["train_state"]["global_step"] == 4  # the last complete checkpoint
    refused = run_script("train_domain.py", stage1_args(sample, tmp_path / "cut"))
    assert refused.returncode == 1 and "run directory exists" in refused.stderr
    resumed = run_script("train_domain.py", stage1_args(sample, tmp_path / "cut") + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    results_full = json.load(open(tmp_path / "full" / "results.json"))
    results_cut = json.load(open(tmp_path / "cut" / "results.json"))
    assert results_full == results_cut
    assert same_weights(tmp_path / "full" / "best_model.bin", tmp_path / "cut" / "best_model.bin")
    last_full = torch.load(tmp_path / "full" / "last_checkpoint.pt", weights_only=True)["model"]
    last_cut = torch.load(tmp_path / "cut" / "last_checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(last_full[k], last_cut[k]) for k in last_full)
    leftovers = [n for n in os.listdir(tmp_path / "cut") if n.startswith(".tmp-")]
    assert leftovers == []


def test_resume_stage4_restores_graph(sample, tmp_path):
    teacher = tmp_path / "teacher"
    common = ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
              "--max_seq_length", "32", "--batch_size", "4", "--val_freq", "2",
              "--no_progress", "--do_train"]
    assert run_script("train_multi_domain.py", common + [
        "--vocab_file", sample["vocab"], "--model_config", "tiny_teacher", "--max_steps", "2",
        "--output_dir", str(teacher)]).returncode == 0
    args = common + ["--teacher_dir", str(teacher), "--student_config", "tiny_student",
                     "--max_steps", "6", "--train_graph", "--do_test"]
    assert run_script("finetune_multi_domain.py",
                      args + ["--output_dir", str(tmp_path / "full")]).returncode == 0
    killed = run_script("finetune_multi_domain.py", args + ["--output_dir", str(tmp_path / "cut")],
                        {"HRKD_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    resumed = run_script("finetune_multi_domain.py",
                         args + ["--output_dir", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    full = torch.load(tmp_path / "full" / "last_checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last_checkpoint.pt", weights_only=True)
    for part in ("model",):
        assert all(torch.equal(full[part][k], cut[part][k]) for k in full[part])
    graph_full, graph_cut = full["extra"]["graph"], cut["extra"]["graph"]
    assert all(torch.equal(graph_full[k], graph_cut[k]) for k in graph_full)
    assert json.load(open(tmp_path / "full" / "results.json")) == \
        json.load(open(tmp_path / "cut" / "results.json"))


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and line), non-zero exit, no run directory.
# ------------------------------------------------------------------------------------------
def broken_copy(sample, tmp_path, mutate):
    data = tmp_path / "data"
    shutil.copytree(sample["mnli"], data / "MNLI")
    shutil.copytree(sample["amazon"], data / "amazon")
    shutil.copy(sample["vocab"], data / "vocab.txt")
    mutate(data)
    return data


def _append(path, text):
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)


def _replace_label(data):
    path = data / "MNLI" / "train.tsv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[4].rstrip("\n").split("\t")
    fields[-1] = "maybe"
    lines[4] = "\t".join(fields) + "\n"
    path.write_text("".join(lines))


BAD_INPUTS = {
    "missing data directory": (lambda d: shutil.rmtree(d / "amazon" / "books"), "amazon", [],
                               "books: data directory not found"),
    "missing data file": (lambda d: os.remove(d / "amazon" / "books" / "negative.review"),
                          "amazon", [], "negative.review: data file not found"),
    "short TSV row": (lambda d: _append(d / "MNLI" / "train.tsv", "1\t2\tfiction\n"), "mnli",
                      [], "train.tsv:"),
    "unknown label": (_replace_label, "mnli", [], "train.tsv:5: unknown label 'maybe'"),
    "genre without examples": (lambda d: (d / "MNLI" / "dev_matched.tsv").write_text(
        (d / "MNLI" / "dev_matched.tsv").read_text().splitlines(keepends=True)[0]), "mnli", [],
        "dev_matched.tsv: no examples of genre"),
    "review file without text": (lambda d: (d / "amazon" / "books" / "positive.review")
                                 .write_text("<review>\n</review>\n"), "amazon", [],
                                 "positive.review: no <review_text> blocks"),
    "missing vocab": (lambda d: os.remove(d / "vocab.txt"), "amazon", [],
                      "vocab.txt: vocabulary file not found"),
    "unknown domain": (lambda d: None, "amazon", ["--domain", "music"],
                       "unknown amazon domain 'music'"),
    "ratio out of range": (lambda d: None, "amazon", ["--train_ratio", "0"],
                           "--train_ratio must be in (0, 1]"),
    "non-positive batch": (lambda d: None, "amazon", ["--batch_size", "0"],
                           "--batch_size must be positive"),
    "sequence too long": (lambda d: None, "amazon", ["--max_seq_length", "300"],
                          "exceeds the model's max_position_embeddings (128)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_with_one_line(sample, tmp_path, case):
    mutate, task, extra, expected = BAD_INPUTS[case]
    data = broken_copy(sample, tmp_path, mutate)
    out = tmp_path / "run"
    args = ["--task", task, "--data_dir", str(data / ("MNLI" if task == "mnli" else "amazon")),
            "--domain", "fiction" if task == "mnli" else "books",
            "--vocab_file", str(data / "vocab.txt"), "--model_config", "tiny_teacher",
            "--max_steps", "2", "--no_progress", "--output_dir", str(out), "--do_train"]
    result = run_script("train_domain.py", args + extra)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_unknown_task_is_refused(sample, tmp_path):
    result = run_script("train_domain.py", ["--task", "imdb", "--data_dir", sample["amazon"],
                                            "--domain", "books", "--output_dir",
                                            str(tmp_path / "run"), "--do_train"])
    assert result.returncode != 0 and "invalid choice: 'imdb'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_that_does_not_fit_the_config(sample, tmp_path):
    from modeling import BertClassifier, resolve_config
    model = BertClassifier(resolve_config("tiny_teacher", 500), num_labels=2)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "pytorch_model.bin")
    out = tmp_path / "run"
    result = run_script("train_domain.py", [
        "--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
        "--vocab_file", sample["vocab"], "--model_config", "tiny_teacher", "--init_checkpoint",
        str(tmp_path), "--no_progress", "--output_dir", str(out), "--do_train"])
    assert result.returncode == 1
    assert "pytorch_model.bin: weight 'embeddings.token_embeddings.weight' has shape (500, 64)" \
        in result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# Numerical faults
# ------------------------------------------------------------------------------------------
def tiny_stage(compute_loss, steps=6):
    from modeling import BertClassifier
    from conftest import tiny_config
    torch.manual_seed(0)
    model = BertClassifier(tiny_config(), 2)
    features = {"input_ids": torch.randint(5, 99, (16, 8)),
                "segment_ids": torch.zeros(16, 8, dtype=torch.long),
                "attention_mask": torch.ones(16, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (16,))}
    stage = training.Stage(model=model, domains=["x"], fit_domain="x", train_features={"x": features},
                        dev_features={"x": features}, head_of={"x": None},
                        compute_loss=compute_loss, checkpoint_meta={})
    import argparse
    args = argparse.Namespace(batch_size=4, seed=0, max_steps=steps, num_train_epochs=1,
                              learning_rate=1e-3, weight_decay=0.0, warmup_proportion=0.0,
                              max_grad_norm=1.0, amp="off", val_freq=2, eval_batch_size=16,
                              resume=False, overwrite=False, no_progress=True,
                              max_nonfinite_steps=3)
    return stage, args


def test_non_finite_losses_skip_updates_then_stop_keeping_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batches):
        calls["n"] += 1
        b = batches[0]
        logits = model(b["input_ids"], b["segment_ids"], b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        return {"loss": loss * float("nan") if calls["n"] >= 3 else loss}

    stage, args = tiny_stage(loss_fn, steps=10)
    run = utils.RunDir(str(tmp_path / "run"))
    args.output_dir = run.path
    run.prepare_for_training(args)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses at step 5"):
        training.train(training.LoopConfig.from_args(args), stage, run,
                       runtime.Distributed())
    saved = torch.load(run.file("last_checkpoint.pt"), weights_only=True)
    assert saved["train_state"]["global_step"] == 4
    # Steps 3-5 were skipped: the weights are still those after step 2, the best checkpoint's.
    best = torch.load(run.best_model(), weights_only=True)
    assert best["step"] == 2
    model = stage.model.state_dict()
    assert all(torch.equal(best["state_dict"][k], model[k]) for k in model)
    assert all(torch.equal(saved["model"][k], model[k]) for k in model)


def test_fp16_scaler_skips_overflowing_step():
    from modeling import BertClassifier
    from conftest import tiny_config
    torch.manual_seed(0)
    model = BertClassifier(tiny_config(), 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = runtime.make_scaler(torch.device("cpu"), "fp16")
    scheduler = training.linear_warmup_schedule(optimizer, 10, 0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model.classifier.weight.sum() * 1e38  # finite, but its scaled gradient overflows
    state = training.TrainState()
    config = training.LoopConfig(batch_size=1, learning_rate=1e-3, max_nonfinite_steps=3)
    training._optimisation_step(config, loss, optimizer, scheduler, scaler,
                             list(model.parameters()), state, runtime.Distributed(), {})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert scaler.get_scale() < 65536.0


# ------------------------------------------------------------------------------------------
# torchrun: 2 processes on gloo
# ------------------------------------------------------------------------------------------
def torchrun(script, args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def ddp_teachers(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    for script, name in (("train_domain.py", "t1"), ("train_multi_domain.py", "t3")):
        args = tiny_teacher_args(sample, root / name, 2, "--do_train", batch_size=4)
        assert run_script(script, args).returncode == 0
    return root


@pytest.mark.parametrize("script,teacher", [("finetune_domain.py", "t1"),
                                            ("finetune_multi_domain.py", "t3")])
def test_torchrun_two_processes(sample, ddp_teachers, tmp_path, script, teacher):
    out = tmp_path / "run"
    result = torchrun(script, [
        "--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
        "--teacher_dir", str(ddp_teachers / teacher), "--student_config", "tiny_student",
        "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "4", "--val_freq", "2",
        "--no_progress", "--output_dir", str(out), "--do_train", "--do_test"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical weights on all 2 ranks" in result.stderr
    log = (out / "train.log").read_text()
    assert log.count("training BertClassifier") == 1  # one writer
    assert "2 processes" in log
    events = os.listdir(out / "tensorboard")
    assert len(events) == 1
    assert json.load(open(out / "results.json"))["test"]["per_domain"]


def test_failed_rank_stops_the_others(sample, ddp_teachers, tmp_path):
    start = time.time()
    result = torchrun("finetune_multi_domain.py", [
        "--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
        "--teacher_dir", str(ddp_teachers / "t3"), "--student_config", "tiny_student",
        "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "50", "--val_freq", "100",
        "--no_progress", "--output_dir", str(tmp_path / "run"), "--do_train"],
        {"HRKD_KILL_AT_STEP": "2", "HRKD_KILL_RANK": "1"}, timeout=180)
    assert result.returncode != 0
    assert time.time() - start < 120
