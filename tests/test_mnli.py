"""MNLI read by column names: GLUE's files and the real sample's (../shared/data/mnli_sample),
the paper's per-genre splits, every stage on the sample, and bad files in one line."""
import os

import pytest

import data_processing as dp
from conftest import ROOT
from test_reliability import run_script

SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnli_sample")
needs_sample = pytest.mark.skipif(not os.path.isdir(SAMPLE),
                                  reason=f"{SAMPLE} absent: the MNLI sample is not in this clone")


def write(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


SAMPLE_HEADER = ["sentence1", "sentence2", "label", "genre"]


def test_the_sample_layout_is_read_by_its_header_names(tmp_path):
    rows = [(f"p{i}", f"h{i}", ["neutral", "entailment", "contradiction"][i % 3], "fiction")
            for i in range(20)] + [("x", "y", "neutral", "travel")]
    write(tmp_path / "mnli_train.tsv", SAMPLE_HEADER, rows)
    # the evaluation file with its columns in another order: names, not positions
    write(tmp_path / "mnli_val.tsv", ["genre", "label", "sentence2", "sentence1"],
          [("fiction", "entailment", "h", "p")])
    splits = dp.MnliProcessor().read_splits(str(tmp_path), "fiction")
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [18, 2, 1]
    assert (splits["train"][0].text_a, splits["train"][0].text_b) == ("p0", "h0")
    assert splits["train"][0].label == dp.MnliProcessor.labels.index("neutral")
    assert [e.text_a for e in splits["dev"]] == ["p18", "p19"]   # the last 10% of the rows
    assert (splits["test"][0].text_a, splits["test"][0].text_b) == ("p", "h")
    assert splits["test"][0].label == dp.MnliProcessor.labels.index("entailment")


@pytest.mark.parametrize("case,expected", [
    ("no layout", "train.tsv: data file not found (expected train.tsv + dev_matched.tsv or "
                  "mnli_train.tsv + mnli_val.tsv in"),
    ("half a layout", "mnli_val.tsv: data file not found (beside"),
    ("neither header", "mnli_train.tsv:1: no genre, gold_label or label column"),
    ("unknown label", "mnli_train.tsv:3: unknown label 'maybe'"),
    ("missing genre", "mnli_val.tsv: no examples of genre 'fiction'"),
])
def test_bad_mnli_files_are_one_line(tmp_path, case, expected):
    rows = [("a", "b", "neutral", "fiction"), ("c", "d", "maybe", "fiction")]
    if case == "neither header":
        write(tmp_path / "mnli_train.tsv", ["premise", "hypothesis", "sentence1", "sentence2"],
              rows)
    elif case != "no layout":
        write(tmp_path / "mnli_train.tsv", SAMPLE_HEADER,
              rows if case == "unknown label" else rows[:1])
    if case not in ("no layout", "half a layout"):
        write(tmp_path / "mnli_val.tsv", SAMPLE_HEADER,
              [("a", "b", "neutral", "travel" if case == "missing genre" else "fiction")])
    with pytest.raises(dp.DataError) as caught:
        dp.MnliProcessor().read_splits(str(tmp_path), "fiction")
    assert expected in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


@needs_sample
def test_the_real_sample_splits_by_genre():
    processor = dp.MnliProcessor()
    counts = {g: [len(s) for s in processor.read_splits(SAMPLE, g).values()]
              for g in processor.domains}
    # per genre: 90% of its train rows to train, the last 10% to dev, its val rows as test
    assert counts["telephone"] == [3843, 427, 1005]
    assert counts["fiction"] == [3452, 384, 995]
    assert sum(sum(c[:2]) for c in counts.values()) == 20000
    assert sum(c[2] for c in counts.values()) == 5000


@needs_sample
@pytest.mark.parametrize("stage", ["train_domain", "train_multi_domain"])
def test_every_stage_runs_on_the_real_sample(tmp_path, minilm_dir, stage):
    """A few tiny steps of stage 1 then 2 (or 3 then 4) with --data_dir the sample as it is."""
    common = ["--task", "mnli", "--data_dir", SAMPLE, "--vocab_file",
              os.path.join(minilm_dir, "vocab.txt"), "--max_seq_length", "32",
              "--batch_size", "4", "--max_steps", "2", "--val_freq", "2", "--no_progress",
              "--train_ratio", "0.01", "--do_train", "--do_test", "--eval_batch_size", "256"]
    teacher = run_script(f"{stage}.py", common + [
        "--domain", "fiction" if stage == "train_domain" else "telephone",
        "--model_config", "tiny_teacher", "--output_dir", str(tmp_path / "teacher")])
    assert teacher.returncode == 0, teacher.stderr
    student_stage = "finetune_domain" if stage == "train_domain" else "finetune_multi_domain"
    student = run_script(f"{student_stage}.py", common + [
        "--domain", "fiction" if stage == "train_domain" else "telephone",
        "--teacher_dir", str(tmp_path / "teacher"), "--student_config", "tiny_student",
        "--output_dir", str(tmp_path / "student")])
    assert student.returncode == 0, student.stderr


def test_one_reproduce_entry_for_both_tasks(tmp_path):
    import subprocess
    env = dict(os.environ, PYTHON="echo", OUT_ROOT=str(tmp_path / "runs"), SEEDS="42",
               MNLI_DIR=str(tmp_path))
    plan = subprocess.run(["bash", "reproduce.sh", "mnli", "table"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout
    commands = [line for line in plan.splitlines() if ".py " in line]
    assert commands and all("--task mnli" in c or c.startswith("report.py") for c in commands)
    scripts = {c.split()[0] for c in commands}
    assert {"train_domain.py", "finetune_domain.py", "train_multi_domain.py",
            "finetune_multi_domain.py", "train_meta_teacher.py", "finetune_metakd.py",
            "baseline_tfidf.py", "report.py"} <= scripts
    assert f"--data_dir {tmp_path}" in commands[0]
    assert "--domain fiction government slate telephone travel" in commands[0]
    # presets/mnli.sh, chosen on dev: length buckets on every stage, the teachers at 2e-4
    stages = [c for c in commands if not c.startswith(("report.py", "baseline_tfidf.py"))]
    assert all("--length_buckets" in c for c in stages)
    teachers = [c for c in stages if c.startswith("train_") and "--init_layers" not in c]
    assert teachers and all("--learning_rate 2e-4" in c for c in teachers)
    # the students at 1e-3 when they distil, at 1e-4 on the labels alone (tune_labels)
    labels_only = [c for c in stages if "/labels_only_" in c]
    distilled = [c for c in stages if c.startswith(("finetune_domain.py", "finetune_multi"))]
    assert len(labels_only) == 2 and all("--learning_rate 1e-4" in c for c in labels_only)
    assert len(distilled) == 2 and all("--learning_rate 1e-3" in c for c in distilled)
    wrong = subprocess.run(["bash", "reproduce.sh", "poetry", "table"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert wrong.returncode == 1 and "unknown task 'poetry'" in wrong.stderr
    # the Amazon name is the same entry
    amazon = subprocess.run(["bash", "reproduce_amazon.sh", "table"], cwd=ROOT,
                            env=dict(env, AMAZON_DIR=str(tmp_path)), capture_output=True,
                            text=True, check=True).stdout
    assert "--task amazon" in amazon and not (tmp_path / "runs").exists()


def test_tune_labels_sweeps_the_labels_only_rate_on_the_fit_genre(tmp_path):
    """`reproduce.sh mnli tune_labels` (also the end of `tune`): the student's model on the labels
    alone, telephone only, one run per rate, dev only (no test figures), each in its own folder."""
    import subprocess
    env = dict(os.environ, PYTHON="echo", OUT_ROOT=str(tmp_path / "runs"), MNLI_DIR=str(tmp_path))
    for step in ("tune_labels", "tune"):
        plan = subprocess.run(["bash", "reproduce.sh", "mnli", step], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True).stdout
        sweep = [line for line in plan.splitlines()
                 if line.startswith("train_domain.py") and "/tune/labels_lr" in line]
        assert [c.split("--learning_rate ")[1].split()[0] for c in sweep] == \
            ["5e-5", "1e-4", "2e-4", "5e-4", "1e-3"], plan
        for command in sweep:
            assert "--domain telephone --init_checkpoint all-MiniLM-L6-v2 --init_layers 1 2" \
                in command and "--do_test" not in command and "--teacher_dir" not in command
            rate = command.split("--learning_rate ")[1].split()[0]
            assert command.endswith(f"/tune/labels_lr{rate}/labels_only_domain/mnli/{{domain}}"
                                    "/seed42")
    assert not (tmp_path / "runs").exists()
