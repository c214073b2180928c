"""The bad-input promise everywhere, and what a new user trips on (one test per case).

Bad input: exit status 1, one short line naming the file or the flag, no traceback, nothing
left in the output folder or the data folder (no run directory, no feature cache).
"""
import json
import os
import stat
import subprocess
import tarfile

import pytest
import torch

import download
from conftest import ROOT
from test_download import amazon_tar
from test_reliability import run_script, stage1_args


def assert_refused(result, *expected, out=None, data=None):
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    # Besides the error, only the progress lines logged before it (timestamped).
    others = [line for line in lines if not line.startswith("error:") and not line[:2].isdigit()]
    assert "Traceback" not in result.stderr and not others, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    if out is not None:
        assert not os.path.exists(out), os.listdir(out)
    if data is not None:
        assert not os.path.exists(os.path.join(data, "cache")), "a feature cache was written"
        cache = os.environ["HRKD_CACHE_DIR"]
        assert not (os.path.isdir(cache) and os.listdir(cache)), "a feature cache was written"


@pytest.fixture
def amazon_copy(sample, tmp_path, monkeypatch):
    """A private copy of the Amazon-format sample and a private default cache folder, so a
    cache written for it would show."""
    import shutil
    monkeypatch.setenv("HRKD_CACHE_DIR", str(tmp_path / "default_cache"))
    target = tmp_path / "amazon"
    shutil.copytree(sample["amazon"], target, ignore=shutil.ignore_patterns("cache"))
    return str(target)


def test_negative_learning_rate_names_the_flag_and_writes_nothing(sample, amazon_copy, tmp_path):
    out = tmp_path / "run"
    args = stage1_args(sample, out) + ["--learning_rate=-1e-4"]
    args[args.index("--data_dir") + 1] = amazon_copy
    assert_refused(run_script("train_domain.py", args), "--learning_rate must be positive",
                   out=out, data=amazon_copy)


@pytest.mark.parametrize("length, expected", [
    ("1000", "--max_seq_length 1000 exceeds the model's max_position_embeddings"),
    ("2", "--max_seq_length must be at least 5")])
def test_sequence_length_is_checked_before_tokenizing(sample, amazon_copy, tmp_path, length,
                                                       expected):
    out = tmp_path / "run"
    args = stage1_args(sample, out) + ["--max_seq_length", length]
    args[args.index("--data_dir") + 1] = amazon_copy
    assert_refused(run_script("train_domain.py", args), expected, out=out, data=amazon_copy)


@pytest.fixture(scope="module")
def six_layer_teacher(sample, tmp_path_factory):
    """A one-step multi-domain teacher of 6 layers (best_model_<domain>.bin for each domain)."""
    folder = tmp_path_factory.mktemp("teacher6")
    config = folder / "six.json"
    config.write_text('{"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 6, '
                      '"num_attention_heads": 4, "intermediate_size": 48, '
                      '"max_position_embeddings": 64}')
    result = run_script("train_multi_domain.py", [
        "--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
        "--vocab_file", sample["vocab"], "--model_config", str(config), "--max_seq_length", "16",
        "--batch_size", "2", "--max_steps", "1", "--no_progress", "--do_train",
        "--output_dir", str(folder / "run")])
    assert result.returncode == 0, result.stderr
    return folder / "run"


def student_args(sample, data, teacher, out, *extra):
    return ["--task", "amazon", "--data_dir", data, "--domain", "books", "--vocab_file",
            sample["vocab"], "--teacher_dir", str(teacher), "--max_seq_length", "16",
            "--batch_size", "2", "--max_steps", "1", "--no_progress", "--do_train",
            "--output_dir", str(out), *extra]


def test_student_that_does_not_divide_the_teacher_suggests_a_fit(sample, amazon_copy, tmp_path,
                                                                  six_layer_teacher):
    out = tmp_path / "run"
    result = run_script("finetune_multi_domain.py", student_args(
        sample, amazon_copy, six_layer_teacher, out, "--student_config", "tinybert_4l_312"))
    assert_refused(result, "a 4-layer student does not fit the 6-layer teacher",
                   "1 or 2 or 3 or 6 layers", "--student_init_layers", out=out, data=amazon_copy)


def test_teacher_folder_missing_a_domain_is_found_before_tokenizing(sample, amazon_copy,
                                                                   tmp_path, six_layer_teacher):
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(six_layer_teacher, teacher)
    os.remove(teacher / "best_model_dvd.bin")
    out = tmp_path / "run"
    result = run_script("finetune_multi_domain.py", student_args(
        sample, amazon_copy, teacher, out, "--student_config", "tiny_student"))
    assert_refused(result, "no stage-3 checkpoint for domain(s) dvd", out=out, data=amazon_copy)


@pytest.fixture(scope="module")
def short_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "run"
    result = run_script("train_domain.py", stage1_args(sample, out, steps=2))
    assert result.returncode == 0, result.stderr
    return out


def _copy_run(short_run, tmp_path):
    import shutil
    target = tmp_path / "run"
    shutil.copytree(short_run, target)
    return target


def test_truncated_resume_checkpoint_is_one_line_naming_it(sample, short_run, tmp_path):
    run = _copy_run(short_run, tmp_path)
    last = run / "last_checkpoint.pt"
    last.write_bytes(last.read_bytes()[:4000])
    result = run_script("train_domain.py", stage1_args(sample, run, steps=2) + ["--resume"])
    assert_refused(result, str(last), "unreadable checkpoint")


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_object_in_resume_checkpoint_is_refused_safely(sample, short_run, tmp_path):
    run = _copy_run(short_run, tmp_path)
    last = run / "last_checkpoint.pt"
    content = torch.load(last, weights_only=True)
    content["extra"] = _Payload()
    torch.save(content, last)
    result = run_script("train_domain.py", stage1_args(sample, run, steps=2) + ["--resume"])
    assert_refused(result, str(last), "refused")
    assert "weights_only" not in result.stderr and "will likely succeed" not in result.stderr


def test_truncated_archive_is_one_line(tmp_path, capsys):
    archive = amazon_tar(tmp_path / "unprocessed.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    assert tarfile.is_tarfile(archive)  # the header survives: the damage is found later
    dataset = tmp_path / "dataset"
    assert download.main(["--dataset_dir", str(dataset), "--from-archive", str(archive)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unprocessed.tar.gz: damaged or truncated archive" in err
    assert not (dataset / "amazon").exists()


def test_non_utf8_byte_in_mnli_names_file_and_line(sample, tmp_path):
    import shutil
    mnli = tmp_path / "MNLI"
    shutil.copytree(sample["mnli"], mnli)
    lines = (mnli / "train.tsv").read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b"\t", b"\xff\t", 1)
    (mnli / "train.tsv").write_bytes(b"\n".join(lines))
    out = tmp_path / "run"
    result = run_script("train_domain.py", [
        "--task", "mnli", "--data_dir", str(mnli), "--domain", "fiction", "--vocab_file",
        sample["vocab"], "--model_config", "tiny_teacher", "--max_steps", "1", "--no_progress",
        "--do_train", "--output_dir", str(out)])
    assert_refused(result, "train.tsv:7: byte 0xff is not UTF-8", out=out)


def test_written_files_follow_the_umask(short_run):
    for name in ("config.json", "results.json", "best_model.bin", "last_checkpoint.pt"):
        mode = stat.S_IMODE(os.stat(short_run / name).st_mode)
        assert mode & stat.S_IRGRP, f"{name}: mode {oct(mode)}"


def test_model_config_defaults_to_the_init_checkpoint_config(sample, minilm_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train_domain.py", [
        "--task", "amazon", "--data_dir", sample["amazon"], "--domain", "books",
        "--init_checkpoint", "all-MiniLM-L6-v2", "--max_seq_length", "16", "--batch_size", "2",
        "--max_steps", "1", "--no_progress", "--do_train", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr
    import json
    config = json.load(open(out / "config.json"))["args"]
    assert config["init_checkpoint"] == minilm_dir and config["model_config"] is None
    log = (out / "train.log").read_text()
    # train.log holds the checkpoint-loading lines the console showed before the run existed.
    assert "loaded 101 weights from" in log and "model.safetensors" in log


def test_sentence_transformers_folder_is_recognised_by_its_top_config(tmp_path, minilm_dir):
    with pytest.raises(download.DownloadError, match="hidden size 384 and 6 layers"):
        download.model_name_from_config(minilm_dir)  # its 1_Pooling/config.json is not read
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 312}')
    (folder / "config.json").write_text('{"hidden_size": 312, "num_hidden_layers": 4}')
    assert download.model_name_from_config(str(folder)) == "tinybert-4l-312"


def test_help_shows_defaults_and_explains_the_fit_domain():
    for script in ("train_domain.py", "finetune_multi_domain.py"):
        text = subprocess.run([os.sys.executable, os.path.join(ROOT, script), "--help"],
                              capture_output=True, text=True, cwd=ROOT).stdout
        assert "(default: 0.9)" in text and "fit domain" in text


def test_dry_run_prints_torchrun_instead_of_running_it():
    env = dict(os.environ, NUM_GPU="4", PYTHON="echo", TASKS="amazon", AMAZON_DOMAINS="books")
    result = subprocess.run(["bash", "train_domain.sh"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-m torch.distributed.run --standalone --nproc_per_node 4 "
                                    "train_domain.py")


def test_teacher_seed_lets_several_student_seeds_share_one_teacher(tmp_path):
    env = dict(os.environ, PYTHON="echo", TASKS="amazon", SEEDS="43 44", TEACHER_SEED="42",
               VARIANTS="uniform", OUT_ROOT=str(tmp_path))
    result = subprocess.run(["bash", "finetune_multi_domain.sh"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = result.stdout.strip().splitlines()
    assert len(runs) == 2
    for seed, line in zip((43, 44), runs):
        assert "train_multi_domain/amazon/seed42 " in line
        assert f"--seed {seed} " in line and line.endswith(f"uniform/seed{seed}")
    # SKIP_FINISHED=1 leaves a run that says it finished alone; a results.json without the
    # completion marker (a stopped run) is not finished: it runs again, told to resume.
    finished = tmp_path / "finetune_multi_domain" / "amazon" / "uniform" / "seed43"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    result = subprocess.run(["bash", "finetune_multi_domain.sh"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(env, SKIP_FINISHED="1"), timeout=60)
    assert result.returncode == 0, result.stderr
    runs = result.stdout.strip().splitlines()
    assert len(runs) == 2 and all("--skip_finished" in line for line in runs)
    (finished / "results.json").write_text(json.dumps(
        {"finished": {"train_steps": 10, "tested": True}}))
    result = subprocess.run(["bash", "finetune_multi_domain.sh"], capture_output=True, text=True,
                            cwd=ROOT, env=dict(env, SKIP_FINISHED="1"), timeout=60)
    assert result.returncode == 0, result.stderr
    runs = result.stdout.strip().splitlines()
    assert [line.endswith("uniform/seed44") for line in runs] == [True]
    assert f"skipped (finished): {finished}" in result.stderr
