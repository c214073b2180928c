"""The teacher cache (teacher_cache.py): exact against the live teacher, reused, verified,
rebuilt when corrupt, off beyond its budget."""
import json
import os

import pytest
import torch

import finetune_domain
import finetune_multi_domain
import teacher_cache
import train_domain
import train_multi_domain
from conftest import tiny_teacher_args


def student_args(sample, teacher, out, cache, *extra, steps=6):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir", str(teacher),
            "--student_config", "tiny_student", "--max_seq_length", "32", "--batch_size", "4",
            "--max_steps", str(steps), "--val_freq", "3", "--learning_rate", "1e-3",
            "--no_progress", "--do_train", "--do_test", "--cache_dir", str(cache),
            "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def teachers(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    assert train_domain.main(tiny_teacher_args(sample, root / "single", 3, "--do_train")) == 0
    assert train_multi_domain.main(tiny_teacher_args(sample, root / "multi", 3,
                                                     "--do_train")) == 0
    return root


def same_run(a, b):
    results_a = json.loads((a / "results.json").read_text())
    results_b = json.loads((b / "results.json").read_text())
    weights_a = torch.load(a / "last_checkpoint.pt", weights_only=True)["model"]
    weights_b = torch.load(b / "last_checkpoint.pt", weights_only=True)["model"]
    return results_a == results_b and all(torch.equal(weights_a[k], weights_b[k])
                                          for k in weights_a)


def entries(cache):
    folder = cache / "teacher"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def test_stage2_cached_equals_uncached_and_is_reused(sample, teachers, tmp_path, caplog):
    cache = tmp_path / "cache"
    args = ["--domain", "books", "--teacher_cache"]
    assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "off",
                                             cache, *args, "off")) == 0
    assert entries(cache) == []
    with caplog.at_level("INFO", logger="hrkd"):
        assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "on",
                                                 cache, *args, "on")) == 0
    assert "computed once and stored" in caplog.text
    assert len(entries(cache)) == 1
    assert same_run(tmp_path / "off", tmp_path / "on")
    caplog.clear()
    with caplog.at_level("INFO", logger="hrkd"):  # another seed reads the same entry
        assert finetune_domain.main(student_args(sample, teachers / "single",
                                                 tmp_path / "seed43", cache, *args, "on",
                                                 "--seed", "43")) == 0
    assert "teacher targets read from" in caplog.text and len(entries(cache)) == 1


@pytest.mark.parametrize("variant", [[], ["--no_use_graph"]])
def test_stage4_cached_equals_uncached(sample, teachers, tmp_path, variant):
    cache = tmp_path / "cache"
    for mode in ("off", "on"):
        assert finetune_multi_domain.main(student_args(
            sample, teachers / "multi", tmp_path / mode, cache, "--teacher_cache", mode,
            *variant)) == 0
    assert len(entries(cache)) == 4  # one per domain (its head, its data)
    assert same_run(tmp_path / "off", tmp_path / "on")


def test_corrupt_entry_is_named_and_rebuilt(sample, teachers, tmp_path, caplog):
    cache = tmp_path / "cache"
    args = ["--domain", "books"]
    assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "a",
                                             cache, *args)) == 0
    [entry] = entries(cache)
    target = cache / "teacher" / entry / "hidden_0.npy"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte: same size, wrong SHA-1
    target.write_bytes(bytes(data))
    with caplog.at_level("INFO", logger="hrkd"):
        assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "b",
                                                 cache, *args)) == 0
    assert f"teacher cache {cache / 'teacher' / entry} unreadable" in caplog.text
    assert "contents do not match its SHA-1" in caplog.text and "computed once" in caplog.text
    assert same_run(tmp_path / "a", tmp_path / "b")
    (cache / "teacher" / entry / "manifest.json").write_text("{")
    caplog.clear()
    with caplog.at_level("INFO", logger="hrkd"):
        assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "c",
                                                 cache, *args)) == 0
    assert "unreadable" in caplog.text and same_run(tmp_path / "a", tmp_path / "c")


def test_over_budget_the_cache_is_off_with_one_line(sample, teachers, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="hrkd"):
        assert finetune_domain.main(student_args(sample, teachers / "single", tmp_path / "run",
                                                 cache, "--domain", "books",
                                                 "--teacher_cache_gb", "0.0001")) == 0
    lines = [r.getMessage() for r in caplog.records if "teacher cache off" in r.getMessage()]
    assert len(lines) == 1 and "would take" in lines[0] and "--teacher_cache_gb" in lines[0]
    assert entries(cache) == []


def test_target_sizes():
    # Real preset at T 64 (MiniLM: width 384, 12 heads; 2-layer student), books' 1631 reviews:
    # 3 hidden states of 64 x 384 and 2 score maps of 12 x 64 x 64 per example, fp32.
    assert teacher_cache.target_bytes(1631, 64, 384, 12, 2, 2) == \
        1631 * (3 * 64 * 384 + 2 * 12 * 64 * 64 + 2) * 4
    # The paper's MNLI (BERT-base, T 128, 4-layer student): about 5.1 MB per example, some
    # 1.8 TB for the ~353k training pairs -- far over any budget, so the teacher runs live.
    per_example = teacher_cache.target_bytes(1, 128, 768, 12, 4, 3)
    assert 5.0e6 < per_example < 5.2e6
    assert 1.7e12 < per_example * 353_000 < 1.9e12
