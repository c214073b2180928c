"""Faults a lab meets (issue 38): bad labels and texts, late errors, the --help of negative
flags. Each test is one item of the issue; the message a user sees is checked as written."""
import json
import os
import time

import pytest

from data_processing import CustomProcessor, DataError, read_table
from sample_corpus import write_custom_corpus
from test_reliability import run_script

DOMAINS = ("books", "dvd", "kitchen")


def corpus(sample, folder, extension):
    return write_custom_corpus(sample["amazon"], str(folder), extension, DOMAINS, with_dev=True,
                               label_names=("no", "yes"))


def custom_args(sample, data, out, *extra):
    return ["--task", "custom", "--data_dir", str(data), "--vocab_file", sample["vocab"],
            "--model_config", "tiny_teacher", "--max_seq_length", "16", "--batch_size", "2",
            "--max_steps", "2", "--val_freq", "2", "--no_progress", "--do_train", "--do_test",
            "--output_dir", str(out), *extra]


def error_lines(result):
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# 5: an empty label or text cell is an error naming file and line, in every format and split --
def blank_cell(path: str, row: int, column: str):
    """Empty ``column`` of the ``row``-th data row of a TSV, CSV or JSON Lines file; returns
    the file line it is on."""
    lines = open(path, encoding="utf-8").read().splitlines()
    if path.endswith(".jsonl"):
        record = json.loads(lines[row - 1])
        record[column] = "" if column == "label" else None
        lines[row - 1] = json.dumps(record)
        number = row
    else:
        separator = "\t" if path.endswith(".tsv") else ","
        header = lines[0].split(separator)
        cells = lines[row].split(separator)
        assert len(cells) == len(header), "a row without quoted separators"
        cells[header.index(column)] = ""
        lines[row] = separator.join(cells)
        number = row + 1
    open(path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    return number


@pytest.mark.parametrize("extension,split,column", [
    ("tsv", "train", "label"), ("csv", "dev", "label"), ("jsonl", "test", "label"),
    ("tsv", "test", "text"), ("jsonl", "train", "text")])
def test_an_empty_label_or_text_is_an_error_naming_file_and_line(sample, tmp_path, extension,
                                                                 split, column):
    data = corpus(sample, tmp_path / "data", extension)
    path = os.path.join(data, "dvd", f"{split}.{extension}")
    line = blank_cell(path, 2, column)
    with pytest.raises(DataError, match=f"{path}:{line}: empty {column}"):
        CustomProcessor(data).read_splits(data, "dvd")
    result = run_script("train_domain.py", custom_args(sample, data, tmp_path / "run",
                                                       "--domain", "dvd"))
    assert result.returncode == 1 and error_lines(result) == [
        f"error: {path}:{line}: empty {column}"]
    assert not (tmp_path / "run").exists()
    # predict.py reads the same files without needing a label: an empty label is no error there
    if column == "label":
        assert len(read_table(path, need_label=False)) > 0


def test_a_bad_last_domain_stops_before_the_first_domain_trains(sample, tmp_path):
    data = corpus(sample, tmp_path / "data", "tsv")
    path = os.path.join(data, "kitchen", "test.tsv")
    line = blank_cell(path, 3, "label")
    began = time.monotonic()
    result = run_script("train_domain.py", custom_args(
        sample, data, tmp_path / "runs" / "{domain}", "--domain", "books", "dvd", "kitchen"))
    assert result.returncode == 1
    assert error_lines(result) == [f"error: {path}:{line}: empty label"]
    assert not (tmp_path / "runs").exists(), os.listdir(tmp_path / "runs")
    assert time.monotonic() - began < 60


# 8: --help of a negative flag says what it does, not "(default: True)" ------------------------
def test_negative_flags_read_right_in_help():
    result = run_script("train_domain.py", ["--help"])
    flat = " ".join(result.stdout.split())
    assert "--no_lowercase keep the text's case (by default it is lowercased" in flat
    assert "(default: True)" not in flat


# 6: the teacher is named as the teacher; an exported folder is a teacher ---------------------
def student_args(sample, teacher, out, *extra):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
            "--teacher_dir", str(teacher), "--student_config", "tiny_student",
            "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "2", "--val_freq", "2",
            "--no_progress", "--do_train", "--do_test", "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def tiny_runs(sample, tmp_path_factory):
    from conftest import train_tiny_runs
    return train_tiny_runs(sample, tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("script", ["finetune_domain.py", "finetune_multi_domain.py"])
def test_a_missing_or_empty_teacher_is_named_as_the_teacher(sample, tmp_path, script):
    missing = run_script(script, student_args(sample, tmp_path / "nowhere", tmp_path / "a"))
    assert missing.returncode == 1 and error_lines(missing) == [
        f"error: --teacher_dir {tmp_path / 'nowhere'}: no such teacher (give the teacher's run "
        f"directory, a checkpoint file, or a folder written by export.py; train the teacher "
        f"first)"]
    (tmp_path / "empty").mkdir()
    empty = run_script(script, student_args(sample, tmp_path / "empty", tmp_path / "b"))
    assert empty.returncode == 1 and len(error_lines(empty)) == 1
    assert "an empty folder, not a teacher" in error_lines(empty)[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_exported_folder_is_a_teacher(sample, tiny_runs, tmp_path):
    import export
    import finetune_domain
    assert export.main([str(tiny_runs / "single"), "--out", str(tmp_path / "hf")]) == 0
    assert finetune_domain.main(student_args(sample, tmp_path / "hf", tmp_path / "student")) == 0
    assert json.load(open(tmp_path / "student" / "results.json"))["finished"]["tested"]
    # stage 4 needs a multi-domain run: the exported folder is refused in one line
    result = run_script("finetune_multi_domain.py",
                        student_args(sample, tmp_path / "hf", tmp_path / "multi"))
    assert result.returncode == 1
    assert "an exported one-domain model; stage 4 distils a multi-domain teacher" in \
        error_lines(result)[0]
    # a teacher of another label set is refused before anything is written
    mnli = ["--task", "mnli", "--data_dir", sample["mnli"], "--domain", "fiction"]
    argv = student_args(sample, tmp_path / "hf", tmp_path / "other")
    argv[:6] = mnli
    result = run_script("finetune_domain.py", argv)
    assert result.returncode == 1 and "the teacher scores 2 labels, this task has 3" in \
        error_lines(result)[0]
    assert not (tmp_path / "other").exists()


# 7: predict.py keeps one output row per input row; bad bytes are errors; file modes -----------
class Completed:
    """predict.py's exit status and output, as subprocess.run gives them (bytes)."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def predict(model, args, stdin: bytes = b""):
    """predict.main in this process (a process start per call would cost seconds), with
    ``stdin`` as its standard input's bytes."""
    import contextlib
    import io
    import sys

    import predict as predict_script
    out, err = io.StringIO(), io.StringIO()
    original = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = predict_script.main([str(model), *args])
    finally:
        sys.stdin = original
    return Completed(code, out.getvalue().encode(), err.getvalue().encode())


def test_predict_keeps_rows_aligned_and_refuses_bad_bytes(tiny_runs, tmp_path):
    model = tiny_runs / "single"
    lines = b"a gripping story\n\nawful plot\t\n\n   \nfine\n"
    result = predict(model, ["--format", "jsonl"], lines)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(r) for r in result.stdout.decode().splitlines()]
    assert len(rows) == 6 and [r["text"] for r in rows] == [
        "a gripping story", "", "awful plot", "", "", "fine"]
    assert rows[1] == {"text": "", "label": None, "probabilities": None}
    tsv = predict(model, [], lines).stdout.decode().splitlines()
    assert len(tsv) == 1 + 6 and tsv[2].strip("\t") == "" and tsv[3].startswith("awful plot\t")
    # the same from a file, and a TSV data file with an empty text row
    (tmp_path / "in.txt").write_bytes(lines)
    from_file = predict(model, ["--file", str(tmp_path / "in.txt"), "--format", "jsonl"])
    assert [json.loads(r)["text"] for r in from_file.stdout.decode().splitlines()] == [
        r["text"] for r in rows]
    (tmp_path / "in.tsv").write_text("text\tlabel\nfine\tpositive\n\tnegative\nbad\t\n")
    table = predict(model, ["--file", str(tmp_path / "in.tsv"), "--format", "jsonl"])
    assert [json.loads(r)["text"] for r in table.stdout.decode().splitlines()] == [
        "fine", "", "bad"]
    # a byte that is not UTF-8: an error naming the line, from a file and from stdin
    (tmp_path / "bad.txt").write_bytes(b"fine\nna\xefve\n")
    bad = predict(model, ["--file", str(tmp_path / "bad.txt")])
    assert bad.returncode == 1 and bad.stderr.decode().strip().splitlines()[-1] == (
        f"error: {tmp_path / 'bad.txt'}:2: byte 0xef is not UTF-8 (convert the file to UTF-8)")
    piped = predict(model, [], b"fine\nna\xefve\n")
    assert piped.returncode == 1 and piped.stderr.decode().strip().splitlines()[-1] == (
        "error: standard input:2: byte 0xef is not UTF-8 (convert the input to UTF-8)")


def test_exported_weights_have_the_mode_of_the_other_files(tiny_runs, tmp_path):
    import export
    assert export.main([str(tiny_runs / "single"), "--out", str(tmp_path / "hf")]) == 0
    modes = {name: os.stat(tmp_path / "hf" / name).st_mode & 0o777
             for name in os.listdir(tmp_path / "hf")}
    assert len(set(modes.values())) == 1, modes


# 2: a run killed before its first checkpoint is not started; orphans go; the true step ------
def stage1(sample, out, *extra, steps=6):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
            "--vocab_file", sample["vocab"], "--model_config", "tiny_teacher",
            "--max_seq_length", "32", "--batch_size", "8", "--max_steps", str(steps),
            "--val_freq", "3", "--learning_rate", "1e-3", "--no_progress", "--output_dir",
            str(out), "--do_train", "--do_test", *extra]


@pytest.fixture(scope="module")
def uninterrupted(sample, tmp_path_factory):
    """The stage-1 run of ``stage1``'s flags, uninterrupted, in a process of its own."""
    out = tmp_path_factory.mktemp("faults_full") / "full"
    full = run_script("train_domain.py", stage1(sample, out))
    assert full.returncode == 0, full.stderr
    return out


@pytest.mark.parametrize("how", [[], ["--skip_finished"], ["--resume"]])
def test_a_run_killed_before_its_first_checkpoint_starts_afresh(sample, tmp_path, how,
                                                                 uninterrupted):
    import utils
    cut = tmp_path / "cut"
    killed = run_script("train_domain.py", stage1(sample, cut), {"HRKD_KILL_AT_STEP": "1"})
    assert killed.returncode == -9
    assert (cut / "config.json").exists() and not (cut / "last_checkpoint.pt").exists()
    assert (cut / ".lock").exists()   # its process is gone: a stale lock
    again = run_script("train_domain.py", stage1(sample, cut, *how))
    assert again.returncode == 0, again.stderr
    assert f"starting afresh: {cut} (its run stopped before its first checkpoint)" in \
        again.stderr
    assert json.load(open(cut / "results.json")) == json.load(
        open(uninterrupted / "results.json"))
    assert utils.run_status(str(cut), need_test=True)["state"] == "finished"


def test_a_live_run_without_checkpoint_is_not_taken_over(sample, tmp_path):
    import socket
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text("{}")
    (cut / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    result = run_script("train_domain.py", stage1(sample, cut, "--skip_finished"))
    assert result.returncode == 1 and "in use by pid" in error_lines(result)[0]


def test_orphaned_temporaries_of_dead_processes_are_removed(sample, tmp_path):
    import subprocess
    import sys
    cut = tmp_path / "cut"
    stopped = run_script("train_domain.py", stage1(sample, cut),
                         {"HRKD_KILL_AT_STEP": "4", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143
    (cut / ".tmp-abc123best_model.bin").write_bytes(b"half")   # a killed atomic write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    cache = tmp_path / "cache"
    (cache / "teacher" / f"0123456789abcdef0123.tmp-{dead}").mkdir(parents=True)
    (cache / "teacher" / f"0123456789abcdef0123.tmp-{os.getpid()}").mkdir()  # alive: kept
    resumed = run_script("train_domain.py", stage1(sample, cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in os.listdir(cut) if n.startswith(".tmp-")]
    student = ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
               "--teacher_dir", str(cut), "--student_config", "tiny_student",
               "--max_seq_length", "32", "--batch_size", "4", "--max_steps", "2",
               "--val_freq", "2", "--no_progress", "--do_train", "--cache_dir", str(cache),
               "--output_dir", str(tmp_path / "student")]
    assert run_script("finetune_domain.py", student).returncode == 0
    left = sorted(os.listdir(cache / "teacher"))
    assert f"0123456789abcdef0123.tmp-{dead}" not in left
    assert f"0123456789abcdef0123.tmp-{os.getpid()}" in left


def test_status_names_the_step_the_resume_state_holds(tmp_path):
    import utils
    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint.pt").write_bytes(b"")
    # killed after an evaluation's results, before its resume state: step 4's results, step 2's
    # resume state (resume_step is written after the resume state)
    (run / "results.json").write_text(json.dumps(
        {"dev": {"last_step": 4, "total_steps": 8}, "resume_step": 2}))
    status = utils.run_status(str(run))
    assert status["step"] == 2 and utils.describe_status(status) == \
        "incomplete: stopped at step 2 of 8"


def test_sigkill_status_and_resume_line_agree_with_the_checkpoint(sample, tmp_path):
    import torch
    cut = tmp_path / "cut"
    killed = run_script("train_domain.py", stage1(sample, cut), {"HRKD_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    saved = torch.load(cut / "last_checkpoint.pt", weights_only=True)["train_state"]
    assert json.load(open(cut / "results.json"))["resume_step"] == saved["global_step"] == 3
    status = run_script("utils.py", ["status", str(cut)])
    assert "stopped at step 3 of 6" in status.stdout
    resumed = run_script("train_domain.py", stage1(sample, cut, "--skip_finished"))
    assert "resuming (incomplete: stopped at step 3 of 6)" in resumed.stderr


# 3: --resume of several stage-4 variants starts those that never began ------------------------
def test_resume_starts_the_variants_that_never_began(sample, tiny_runs, tmp_path):
    base = ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir",
            str(tiny_runs / "multi"), "--student_config", "tiny_student", "--max_seq_length",
            "32", "--batch_size", "4", "--max_steps", "4", "--val_freq", "2", "--no_progress",
            "--do_train", "--do_test", "--output_dir", str(tmp_path / "{variant}")]
    stopped = run_script("finetune_multi_domain.py", base + ["--variant", "no_graph", "hrkd"],
                         {"HRKD_KILL_AT_STEP": "3", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143 and not (tmp_path / "hrkd").exists()
    resumed = run_script("finetune_multi_domain.py", base + ["--variant", "no_graph", "hrkd",
                                                             "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"starting: {tmp_path / 'hrkd'} (nothing to resume there)" in resumed.stderr
    for variant in ("no_graph", "hrkd"):
        assert json.load(open(tmp_path / variant / "results.json"))["finished"]["tested"]


# 4: --resume with changed settings is refused unless meant; config.json records it ----------
def test_resume_with_changed_settings_is_refused_unless_allowed(sample, tmp_path):
    cut = tmp_path / "cut"
    stopped = run_script("train_domain.py", stage1(sample, cut),
                         {"HRKD_KILL_AT_STEP": "4", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143
    changed = stage1(sample, cut, "--resume")
    changed[changed.index("--learning_rate") + 1] = "2e-3"
    refused = run_script("train_domain.py", changed)
    assert refused.returncode == 1 and error_lines(refused) == [
        f"error: {cut} was trained with other settings (learning_rate 0.001 -> 0.002); "
        f"--allow_changed_settings continues it with the new ones, --overwrite retrains it, "
        f"or choose another --output_dir"]
    allowed = run_script("train_domain.py", changed + ["--allow_changed_settings"])
    assert allowed.returncode == 0, allowed.stderr
    config = json.load(open(cut / "config.json"))
    assert config["args"]["learning_rate"] == 0.002
    assert [r["changed"] for r in config["resumes"]] == [["learning_rate 0.001 -> 0.002"]]
    assert not (cut / "config_resumed.json").exists()


# 1: a full disk ends the run at once, in one line; --resume after freeing space finishes it ---
def test_event_file_reads_back_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboardX.crc32c import crc32c as reference_crc32c

    import event_file
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert event_file.crc32c(data) == reference_crc32c(data)
    writer = event_file.EventFileWriter(str(tmp_path / "tb"))
    for step in (1, 2, 300):
        writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_scalar("dev/books", 0.5 + step / 1000, step)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["dev/books", "train/loss"]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 300]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 300], rel=1e-6)


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="mounting the small tmpfs of a full disk needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs of its own (mounted as root: the tests using it are skipped otherwise)."""
    import subprocess
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs as root: {mounted.stderr.strip()}"
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@needs_root
def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(sample, small_disk,
                                                                      uninterrupted):
    cut = small_disk / "run"
    began = time.monotonic()
    stopped = run_script("train_domain.py", stage1(sample, cut),
                         {"HRKD_FILL_DISK_AT_STEP": "4"}, timeout=120)
    assert time.monotonic() - began < 110   # promptly, not a hang
    assert stopped.returncode == 1
    [line] = error_lines(stopped)
    assert "the disk is full (no space left on device)" in line and str(cut) in line, line
    assert "--resume" in line
    assert not [n for n in os.listdir(cut) if n.startswith(".tmp-")]
    os.remove(small_disk / ".hrkd-filler")
    resumed = run_script("train_domain.py", stage1(sample, cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(cut / "results.json")) == json.load(
        open(uninterrupted / "results.json"))


@needs_root
def test_a_full_disk_at_the_start_is_named(sample, tmp_path, small_disk):
    with open(small_disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    result = run_script("train_domain.py", stage1(sample, small_disk / "run"))
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "the disk is full" in line and str(small_disk) in line, line
    assert "Errno" not in line and "enforce fail" not in line
    assert not (small_disk / "run").exists()
    # the feature cache on a full disk: named the same way
    os.makedirs(tmp_path / "out", exist_ok=True)
    cached = run_script("train_domain.py", stage1(sample, tmp_path / "out" / "run",
                                                  "--cache_dir", str(small_disk / "cache")))
    assert cached.returncode == 1
    [line] = error_lines(cached)
    assert "the disk is full" in line and str(small_disk / "cache") in line, line
