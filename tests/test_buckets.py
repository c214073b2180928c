"""Length buckets (--length_buckets): the sampler's batches, what padding changes and what it
does not (one test per claim of the README), and a stop and --resume seeing the same batches."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metakd
from conftest import tiny_distillation_configs, tiny_teacher_args
from data_processing import MultiDomainBatchSampler, trim_to_longest
from distillation import (attention_mse, domain_prototypes, hidden_mse, soft_cross_entropy)
from modeling import BertClassifier
from test_reliability import run_script


def sampler_pair(sizes=(300, 250), batch=8, buckets=5, seed=42):
    rng = np.random.default_rng(0)
    lengths = [rng.integers(5, 128, size=n) for n in sizes]
    plain = MultiDomainBatchSampler(list(sizes), batch, 0, seed)
    bucketed = MultiDomainBatchSampler(list(sizes), batch, 0, seed, lengths=lengths,
                                       bucket_batches=buckets)
    return plain, bucketed, lengths


def test_buckets_regroup_each_epochs_examples_and_pad_less():
    plain, bucketed, lengths = sampler_pair()
    for epoch in range(3):
        steps, grouped = list(plain.epoch(epoch)), list(bucketed.epoch(epoch))
        assert len(steps) == len(grouped) == len(plain)
        for d in range(2):   # the same examples, as often, in the epoch
            assert sorted(np.concatenate([s[d] for s in steps])) == sorted(
                np.concatenate([s[d] for s in grouped]))
        padded = [sum(max(lengths[d][s[d]].max() for d in range(2)) for s in run)
                  for run in (steps, grouped)]
        assert padded[1] < 0.8 * padded[0]
    # batches are mixed afresh every epoch (not the same groups of lengths)
    first = {tuple(sorted(s[0])) for s in bucketed.epoch(0)}
    assert first != {tuple(sorted(s[0])) for s in bucketed.epoch(1)}


def test_buckets_are_seeded_and_resumable():
    _, bucketed, _ = sampler_pair()
    again = sampler_pair()[1]
    whole = list(bucketed.epoch(1))
    assert all(np.array_equal(a[d], b[d]) for a, b in zip(whole, again.epoch(1))
               for d in range(2))
    later = list(bucketed.epoch(1, start_step=7))
    assert all(np.array_equal(a[d], b[d]) for a, b in zip(whole[7:], later) for d in range(2))
    other = sampler_pair(seed=43)[1]
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(whole, other.epoch(1)))


def test_a_steps_domains_hold_batches_of_the_same_length_rank():
    _, bucketed, lengths = sampler_pair(sizes=(400, 400))
    longest = np.array([[lengths[d][s[d]].max() for d in range(2)] for s in bucketed.epoch(0)])
    ranks = [np.argsort(np.argsort(longest[:, d], kind="stable"), kind="stable")
             for d in range(2)]
    assert np.corrcoef(ranks[0], ranks[1])[0, 1] > 0.9


# ----------------------------------------------------------------------------------------------
# What a batch padded to its longest input changes (README "Length buckets")
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def padded_and_trimmed():
    """A tiny teacher and student on a batch padded to 16 and the same batch cut to its
    longest input (10), in eval mode (no dropout)."""
    teacher_config, student_config = tiny_distillation_configs()
    torch.manual_seed(0)
    teacher = BertClassifier(teacher_config, 3).eval()
    student = BertClassifier(student_config, 3, fit_size=teacher_config.hidden_size).eval()
    ids = torch.randint(5, 30, (3, 16))
    mask = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate((10, 6, 3)):
        mask[row, :length] = 1
    ids = ids * mask
    full = {"input_ids": ids, "segment_ids": torch.zeros_like(ids), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 2])}
    [cut] = trim_to_longest([full])
    assert cut["input_ids"].shape == (3, 10)
    with torch.no_grad():
        outs = {name: (teacher(b["input_ids"], b["segment_ids"], b["attention_mask"]),
                       student(b["input_ids"], b["segment_ids"], b["attention_mask"]))
                for name, b in (("full", full), ("cut", cut))}
    return outs, full


def test_invariant_logits_cross_entropy_and_soft_cross_entropy(padded_and_trimmed):
    """Stages 1 and 3 (cross-entropy), the prediction term of stages 2 and 4 and Meta-KD's B2
    read [CLS] only: the same to rounding."""
    outs, full = padded_and_trimmed
    (teacher_full, student_full), (teacher_cut, student_cut) = outs["full"], outs["cut"]
    assert torch.allclose(student_full.logits, student_cut.logits, atol=1e-5)
    assert F.cross_entropy(student_full.logits, full["labels"]).item() == pytest.approx(
        F.cross_entropy(student_cut.logits, full["labels"]).item(), abs=1e-5)
    assert soft_cross_entropy(student_full.logits, teacher_full.logits).item() == \
        pytest.approx(soft_cross_entropy(student_cut.logits, teacher_cut.logits).item(),
                      abs=1e-6)
    assert metakd.prediction_loss(student_full.logits, teacher_full.logits).item() == \
        pytest.approx(metakd.prediction_loss(student_cut.logits, teacher_cut.logits).item(),
                      abs=1e-6)
    # the teacher's kept positions too: what the teacher cache slices is what a run at the
    # shorter length computes
    assert torch.allclose(teacher_full.hidden_states[-1][:, :10], teacher_cut.hidden_states[-1],
                          atol=1e-5)


def test_changed_hidden_and_attention_mse_prototypes_and_metakd_means(padded_and_trimmed):
    """The terms that average over every position, padded ones included, change: the hidden
    and attention MSE of stages 2 and 4 and Meta-KD's B1, HRKD's domain prototypes, Meta-KD's
    domain features (mean over positions 1..T-1)."""
    outs, _ = padded_and_trimmed
    (teacher_full, student_full), (teacher_cut, student_cut) = outs["full"], outs["cut"]

    def differs(a, b):
        return abs(float(a) - float(b)) > 1e-4 * max(abs(float(a)), 1e-6)

    assert differs(hidden_mse(student_full.hidden_states[1], teacher_full.hidden_states[2]),
                   hidden_mse(student_cut.hidden_states[1], teacher_cut.hidden_states[2]))
    assert differs(attention_mse(student_full.attention_scores[0],
                                 teacher_full.attention_scores[1]),
                   attention_mse(student_cut.attention_scores[0],
                                 teacher_cut.attention_scores[1]))
    assert differs(domain_prototypes([student_full.hidden_states]).sum(),
                   domain_prototypes([student_cut.hidden_states]).sum())
    assert differs(metakd.tail_mean(teacher_full.hidden_states[-1]).sum(),
                   metakd.tail_mean(teacher_cut.hidden_states[-1]).sum())


def test_a_stop_and_resume_sees_the_same_bucketed_batches(sample, tmp_path):
    def argv(out, *extra):
        return tiny_teacher_args(sample, out, 8, "--learning_rate", "1e-3", "--val_freq", "2",
                                 "--length_buckets", "--do_train", "--do_test", *extra)
    full = run_script("train_domain.py", argv(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    stopped = run_script("train_domain.py", argv(cut),
                         {"HRKD_KILL_AT_STEP": "5", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143
    resumed = run_script("train_domain.py", argv(cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(cut / "results.json")) == json.load(
        open(tmp_path / "full" / "results.json"))
    config = json.load(open(cut / "config.json"))
    assert config["args"]["length_buckets"] is True


def test_cached_teacher_targets_are_cut_to_the_bucketed_batch(sample, tmp_path, monkeypatch):
    """Stage 4 with --length_buckets: the teacher cache's rows sliced to the batch's length give
    the losses the live teachers give on the cut batch (to rounding)."""
    import finetune_multi_domain
    import train_multi_domain
    from test_golden import losses_of_first_steps
    teacher = tmp_path / "teacher"
    assert train_multi_domain.main(tiny_teacher_args(sample, teacher, 2, "--do_train")) == 0

    def argv(out, cache):
        return ["--task", "amazon", "--data_dir", sample["amazon"], "--teacher_dir",
                str(teacher), "--student_config", "tiny_student", "--max_seq_length", "32",
                "--batch_size", "4", "--max_steps", "3", "--val_freq", "3", "--no_progress",
                "--do_train", "--length_buckets", "--teacher_cache", cache,
                "--output_dir", str(out)]
    live = losses_of_first_steps(monkeypatch, finetune_multi_domain.main,
                                 argv(tmp_path / "live", "off"))
    cached = losses_of_first_steps(monkeypatch, finetune_multi_domain.main,
                                   argv(tmp_path / "cached", "on"))
    for step in (1, 2, 3):
        for name, value in live[step].items():
            assert cached[step][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, name)
