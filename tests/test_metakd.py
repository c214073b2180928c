"""Meta-KD (metakd.py, train_meta_teacher.py, finetune_metakd.py): each term against a hand
computation on tiny tensors, the golden first steps of both stages through their mains, stops
and --resume in both stages, bad input."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import finetune_metakd
import metakd
import train_meta_teacher
import training
import utils
from conftest import tiny_teacher_args
from modeling import BertClassifier, resolve_config
from test_golden import assert_golden
from test_reliability import run_script, same_weights


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) *
                                                         sum(y * y for y in b))


# ------------------------------------------------------------------------------------------
# A0: prototype scores
# ------------------------------------------------------------------------------------------
def test_prototype_scores_of_three_domains_by_hand():
    embeddings = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]),     # p_0 = (0.5, 0.5)
                  torch.tensor([[1.0, 1.0], [3.0, 1.0]]),     # p_1 = (2, 1)
                  torch.tensor([[0.0, 2.0], [0.0, 4.0]])]     # p_2 = (0, 3)
    scores = metakd.prototype_scores(embeddings)
    # domain 0: q_0 = mean(p_1, p_2) = (1, 2)
    assert scores[0][0].item() == pytest.approx((cos((1, 0), (.5, .5)) + cos((1, 0), (1, 2))) / 2,
                                                abs=1e-6)
    assert scores[0][1].item() == pytest.approx((cos((0, 1), (.5, .5)) + cos((0, 1), (1, 2))) / 2,
                                                abs=1e-6)
    # domain 1: q_1 = mean(p_0, p_2) = (0.25, 1.75)
    assert scores[1][1].item() == pytest.approx(
        (cos((3, 1), (2, 1)) + cos((3, 1), (0.25, 1.75))) / 2, abs=1e-6)
    # domain 2: q_2 = mean(p_0, p_1) = (1.25, 0.75); its examples point along p_2
    assert scores[2][0].item() == pytest.approx((1 + cos((0, 1), (1.25, 0.75))) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="two or more domains"):
        metakd.prototype_scores(embeddings[:1])


def test_tail_mean_drops_cls_and_keeps_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    assert torch.equal(metakd.tail_mean(hidden), hidden[:, 1:].mean(dim=1))
    assert metakd.tail_mean(hidden)[0].tolist() == [6.0, 7.0, 8.0]   # rows 1..3 of sample 0


def test_instance_weights_embed_the_untuned_encoder_and_are_cached(tmp_path, monkeypatch):
    config = resolve_config("tiny_teacher", 40)
    torch.manual_seed(0)
    encoder = BertClassifier(config, 2)
    generator = torch.Generator().manual_seed(1)

    def split(count):
        ids = torch.randint(5, 40, (count, 10), generator=generator)
        return {"input_ids": ids, "segment_ids": torch.zeros_like(ids),
                "attention_mask": torch.ones_like(ids), "labels": torch.zeros(count).long()}

    train = {"a": split(5), "b": split(3), "c": split(4)}
    content = metakd.instance_weights(encoder, train, str(tmp_path), 2, torch.device("cpu"))
    assert encoder.training  # embedded in eval mode (no dropout), then put back
    encoder.eval()
    with torch.no_grad():
        expected = metakd.prototype_scores([
            metakd.tail_mean(encoder.encode(f["input_ids"], f["segment_ids"],
                                            f["attention_mask"])[0][-1]) for f in train.values()])
    for domain, t in zip(train, expected):
        assert torch.allclose(content["weights"][domain], t, atol=1e-6)
    # the second call reads the file (computing again would fail here), also for a model whose
    # pooler and head differ (another seed's), since e_i does not read them
    monkeypatch.setattr(metakd, "prototype_scores", lambda *a: pytest.fail("recomputed"))
    other = BertClassifier(config, 2)
    other.load_state_dict(encoder.state_dict())
    other.classifier.weight.data += 1.0
    other.cls_pooler.dense.weight.data += 1.0
    again = metakd.instance_weights(other, train, str(tmp_path), 2, torch.device("cpu"))
    assert all(torch.equal(again["weights"][d], content["weights"][d]) for d in train)


# ------------------------------------------------------------------------------------------
# A1-A2: the corrupted-domain loss
# ------------------------------------------------------------------------------------------
def test_meta_teacher_loss_with_a_fixed_permutation_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    domain_logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    domains = torch.tensor([0, 1, 2])
    permutation = torch.tensor([2, 0, 1])       # row i learns the domain of row pi(i)
    corrupted = domains[permutation]            # (2, 0, 1)
    t = torch.tensor([0.5, 1.0, 0.25])
    out = metakd.meta_teacher_loss(logits, domain_logits, labels, corrupted, t, 0.5)

    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    per_example = [ce([2, 0], 0) + 0.5 * ce([1, 0, 0], 2),
                   ce([0, 1], 0) + 0.5 * ce([0, 0, 0], 0),
                   ce([1, 1], 1) + 0.5 * ce([0, 2, 0], 1)]
    assert out["loss"].item() == pytest.approx(
        sum(w * v for w, v in zip(t.tolist(), per_example)) / 3, abs=1e-6)
    unweighted = metakd.meta_teacher_loss(logits, domain_logits, labels, corrupted, None, 0.5)
    assert unweighted["loss"].item() == pytest.approx(sum(per_example) / 3, abs=1e-6)


def test_meta_teacher_step_permutes_the_batch_with_torchs_generator():
    config = resolve_config("tiny_teacher", 40)
    torch.manual_seed(0)
    model, branch = BertClassifier(config, 2), metakd.DomainBranch(config.hidden_size, 2, 0.0)
    model.eval()
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        ids = torch.randint(5, 40, (3, 8), generator=generator)
        batches.append({"input_ids": ids, "segment_ids": torch.zeros_like(ids),
                        "attention_mask": torch.ones_like(ids),
                        "labels": torch.tensor([0, 1, 1]), "example_index": torch.arange(3)})
    weights = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.4, 0.5, 0.6])]
    loss = metakd.make_meta_teacher_loss(branch, weights, metakd.MetaKDConfig())
    torch.manual_seed(7)
    got = loss(model, batches)["loss"]
    torch.manual_seed(7)
    corrupted = torch.tensor([0, 0, 0, 1, 1, 1])[torch.randperm(6)]
    ids = torch.cat([b["input_ids"] for b in batches])
    out = model(ids, torch.zeros_like(ids), torch.ones_like(ids))
    expected = metakd.meta_teacher_loss(out.logits, branch(out.hidden_states[-1],
                                                           torch.tensor([0, 0, 0, 1, 1, 1])),
                                        torch.tensor([0, 1, 1, 0, 1, 1]), corrupted,
                                        torch.cat(weights), 0.5)["loss"]
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------
# B1 and B2
# ------------------------------------------------------------------------------------------
def test_expertise_weight_is_the_codes_sigmoid():
    logits = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([1, 0, 0])
    p = torch.softmax(logits, -1)[torch.arange(3), labels]
    expected = [1 / (1 + math.exp((1 - v) ** 2)) for v in p.tolist()]
    assert metakd.expertise_weights(logits, labels).tolist() == pytest.approx(expected, abs=1e-7)
    assert 1 / (1 + math.e) <= min(expected) and max(expected) <= 0.5


def test_intermediate_loss_weights_each_instance_or_the_batch_mean():
    terms = {"hidden": torch.tensor([1.0, 3.0]), "attention": torch.tensor([0.5, 0.0]),
             "domain": torch.tensor([2.0, 4.0])}
    w = torch.tensor([0.3, 0.6])
    per_example = [1.0 + 0.5 + 0.5 * 2.0, 3.0 + 0.0 + 0.5 * 4.0]        # 2.5, 5.0
    out = metakd.intermediate_loss(terms, w, 0.5)
    assert out["loss"].item() == pytest.approx((0.3 * per_example[0] + 0.6 * per_example[1])
                                               / 2, rel=1e-6)
    code = metakd.intermediate_loss(terms, w, 0.5, on_batch_mean=True)
    # the code: (mean hid + mean att + 0.5 mean dom) * mean w = 3.75 * 0.45
    assert code["loss"].item() == pytest.approx((2.0 + 0.25 + 0.5 * 3.0) * 0.45, rel=1e-6)
    assert (2.5 + 5.0) / 2 == pytest.approx(2.0 + 0.25 + 0.5 * 3.0)


def test_intermediate_terms_per_instance_by_hand():
    generator = torch.Generator().manual_seed(3)
    B, T, H, heads = 2, 3, 4, 2
    student_hidden = [torch.randn(B, T, H, generator=generator) for _ in range(3)]   # 2 blocks
    teacher_hidden = [torch.randn(B, T, H, generator=generator) for _ in range(5)]   # 4 blocks
    student_scores = [torch.randn(B, heads, T, T, generator=generator) for _ in range(2)]
    teacher_scores = [torch.randn(B, heads, T, T, generator=generator) for _ in range(4)]
    teacher_scores[1][:, :, :, -1] = -10000.0   # a padded key: probability 0
    sf, tf = torch.randn(B, H, generator=generator), torch.randn(B, H, generator=generator)
    terms = metakd.intermediate_terms(student_hidden, student_scores, teacher_hidden,
                                      teacher_scores, sf, tf)
    for i in range(B):
        hidden = sum(((student_hidden[k][i] - teacher_hidden[2 * k][i]) ** 2).mean()
                     for k in range(3))
        attention = sum(((torch.softmax(student_scores[j][i], -1)
                          - torch.softmax(teacher_scores[2 * j + 1][i], -1)) ** 2).mean()
                        for j in range(2))
        assert terms["hidden"][i].item() == pytest.approx(hidden.item(), rel=1e-6)
        assert terms["attention"][i].item() == pytest.approx(attention.item(), rel=1e-6)
        assert terms["domain"][i].item() == pytest.approx(((sf[i] - tf[i]) ** 2).mean().item(),
                                                          rel=1e-6)
    # the batch mean of the per-instance terms is the code's batch MSE
    assert terms["hidden"].mean().item() == pytest.approx(sum(
        F.mse_loss(student_hidden[k], teacher_hidden[2 * k]) for k in range(3)).item(), rel=1e-6)


def test_prediction_loss_at_temperature_two_by_hand():
    student = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0]])

    def row(s, t):
        z = math.exp(t[0] / 2) + math.exp(t[1] / 2)
        log_z = math.log(math.exp(s[0] / 2) + math.exp(s[1] / 2))
        return -sum(math.exp(t[c] / 2) / z * (s[c] / 2 - log_z) for c in range(2))

    expected = (row([1, -1], [2, 0]) + row([0, 2], [1, 1])) / 2      # no T^2, summed classes
    assert metakd.prediction_loss(student, teacher, 2.0).item() == pytest.approx(expected,
                                                                                abs=1e-6)


def test_domain_branch_feature_and_logits():
    torch.manual_seed(0)
    branch = metakd.DomainBranch(4, 3, dropout=0.0)
    hidden = torch.randn(2, 5, 4)
    domains = torch.tensor([2, 0])
    feature = branch.dense(branch.embedding.weight[domains] + hidden[:, 1:].mean(1))
    assert torch.allclose(branch.feature(hidden, domains), feature, atol=1e-6)
    assert torch.allclose(branch(hidden, domains),
                          branch.classifier(torch.tanh(feature)), atol=1e-6)


# ------------------------------------------------------------------------------------------
# Through the stages' mains
# ------------------------------------------------------------------------------------------
def meta_teacher_argv(sample, out, steps=3, *extra):
    return tiny_teacher_args(sample, out, steps, "--learning_rate", "1e-3", "--val_freq", "3",
                             "--do_train", "--do_test", *extra)


def student_argv(sample, teacher, out, *extra, domain="books"):
    return ["--task", "amazon", "--data_dir", sample["amazon"], "--domain", domain,
            "--vocab_file", sample["vocab"], "--teacher_dir", str(teacher), "--student_config",
            "tiny_student", "--max_seq_length", "32", "--batch_size", "4",
            "--intermediate_max_steps", "3", "--max_steps", "6", "--val_freq", "2",
            "--learning_rate", "1e-3", "--no_progress", "--do_train", "--do_test",
            "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def meta_teacher(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("metakd") / "teacher"
    assert train_meta_teacher.main(meta_teacher_argv(sample, out, 6)) == 0
    return out


def losses_of_each_phase(monkeypatch, main, argv, steps=3):
    """[{step: {term: value}}, ...]: the first ``steps`` training steps of each training loop
    ``main(argv)`` runs, in order (stage B runs two, each counting from step 1)."""
    phases = []
    original = training._log_scalars

    def record(writer, prefix, values, step):
        if prefix == "train" and step <= steps:
            if step == 1:
                phases.append({})
            phases[-1][step] = {k: float(v) for k, v in values.items() if k != "lr"}
        return original(writer, prefix, values, step)

    monkeypatch.setattr(training, "_log_scalars", record)
    try:
        assert main(argv) == 0
    finally:
        monkeypatch.undo()
    return phases


# Recorded from this code (2026-12-07); a change that moves any of them changes the method.
GOLDEN_TEACHER = {
    1: {"loss": 1.366234302520752, "ce": 0.6865922212600708, "domain_ce": 1.3851234912872314},
    2: {"loss": 1.368936538696289, "ce": 0.6889241337776184, "domain_ce": 1.3868727684020996},
    3: {"loss": 1.3991893529891968, "ce": 0.7179421782493591, "domain_ce": 1.38675856590271},
}
GOLDEN_B1 = {
    1: {"loss": 2.6946072578430176, "hidden_loss": 3.038402557373047,
        "attention_loss": 1.536466470497544e-06, "domain_loss": 0.01328342966735363,
        "weight": 0.884915828704834},
    2: {"loss": 2.667095422744751, "hidden_loss": 2.9636454582214355,
        "attention_loss": 1.5397536117234267e-06, "domain_loss": 0.012377578765153885,
        "weight": 0.8980618119239807},
    3: {"loss": 2.6298868656158447, "hidden_loss": 2.9205644130706787,
        "attention_loss": 1.456515974496142e-06, "domain_loss": 0.012792710214853287,
        "weight": 0.8985045552253723},
}
GOLDEN_B2 = {1: {"loss": 0.6936684846878052}, 2: {"loss": 0.6930478811264038},
             3: {"loss": 0.6927816271781921}}


def test_golden_meta_teacher(sample, tmp_path, monkeypatch):
    [recorded] = losses_of_each_phase(monkeypatch, train_meta_teacher.main,
                                      meta_teacher_argv(sample, tmp_path / "run"))
    assert_golden(recorded, GOLDEN_TEACHER)
    saved = torch.load(tmp_path / "run" / metakd.INSTANCE_WEIGHTS_FILE, weights_only=True)
    assert list(saved["weights"]) == ["books", "dvd", "electronics", "kitchen"]
    best = torch.load(tmp_path / "run" / "best_model.bin", weights_only=True)
    assert "domain_branch_state_dict" in best and best["model_args"]["num_domains"] is None


def test_golden_student_b1_then_b2(sample, meta_teacher, tmp_path, monkeypatch):
    out = tmp_path / "student"
    b1, b2 = losses_of_each_phase(monkeypatch, finetune_metakd.main,
                                  student_argv(sample, meta_teacher, out))
    assert_golden(b1, GOLDEN_B1)
    assert_golden(b2, GOLDEN_B2)
    intermediate = json.load(open(out / metakd.INTERMEDIATE_DIR / "results.json"))
    assert intermediate["finished"] == {"train_steps": 3, "tested": False}
    results = json.load(open(out / "results.json"))
    assert results["finished"] == {"train_steps": 6, "tested": True}
    assert list(results["test"]["per_domain"]) == ["books"]
    # B2 starts from B1's final student (its encoder), with B2's own optimiser
    b1_final = torch.load(out / metakd.INTERMEDIATE_DIR / "last_checkpoint.pt",
                          weights_only=True)
    assert b1_final["train_state"]["global_step"] == 3 and "domain_branch" in b1_final["extra"]


def test_meta_teacher_sigterm_then_resume_matches_the_uninterrupted_run(sample, tmp_path):
    full = tmp_path / "full"   # in a process like the cut one: same threads, same rounding
    assert run_script("train_meta_teacher.py", meta_teacher_argv(sample, full, 6)).returncode == 0
    cut = tmp_path / "cut"
    argv = meta_teacher_argv(sample, cut, 6)
    stopped = run_script("train_meta_teacher.py", argv,
                         {"HRKD_KILL_AT_STEP": "4", "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped at step 4 of 6 by SIGTERM; continue with --resume" in stopped.stderr
    resumed = run_script("train_meta_teacher.py", argv + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(cut / "results.json")) == json.load(open(full / "results.json"))
    assert same_weights(cut / "best_model.bin", full / "best_model.bin")
    branch = [torch.load(run / "best_model.bin", weights_only=True)["domain_branch_state_dict"]
              for run in (cut, full)]
    assert all(torch.equal(branch[0][k], branch[1][k]) for k in branch[0])


@pytest.fixture(scope="module")
def uninterrupted_student(sample, meta_teacher, tmp_path_factory):
    """The student run the stopped ones must end as (its own process, as theirs)."""
    out = tmp_path_factory.mktemp("metakd_full") / "full"
    full = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, out))
    assert full.returncode == 0, full.stderr
    return out


@pytest.mark.parametrize("kill_at,phase", [(2, "B1"), (5, "B2")])
def test_student_sigterm_then_resume_in_either_phase(sample, meta_teacher, tmp_path, kill_at,
                                                     phase, uninterrupted_student):
    """B1 runs 3 steps, B2 6: step 2 stops B1, step 5 stops B2 (B1's steps end at 3)."""
    full = uninterrupted_student
    cut = tmp_path / "cut"
    stopped = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, cut),
                         {"HRKD_KILL_AT_STEP": str(kill_at), "HRKD_KILL_SIGNAL": "TERM"})
    assert stopped.returncode == 143, stopped.stderr
    total = 3 if phase == "B1" else 6
    assert f"stopped at step {kill_at} of {total} by SIGTERM" in stopped.stderr
    b1_state = utils.run_status(str(cut / metakd.INTERMEDIATE_DIR))["state"]
    assert b1_state == ("incomplete" if phase == "B1" else "finished")
    assert utils.run_status(str(cut))["state"] == ("missing" if phase == "B1" else "incomplete")
    refused = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, cut))
    assert refused.returncode == 1 and "pass --resume" in refused.stderr
    resumed = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, cut)
                         + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(cut / "results.json")) == json.load(open(full / "results.json"))
    assert same_weights(cut / "best_model.bin", full / "best_model.bin")
    again = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, cut)
                       + ["--skip_finished"])
    assert again.returncode == 0 and "skipped (finished)" in again.stderr
    changed = run_script("finetune_metakd.py", student_argv(sample, meta_teacher, cut,
                                                            "--domain_loss_weight", "0.2")
                         + ["--skip_finished"])
    assert changed.returncode == 1 and "domain_loss_weight 0.5 -> 0.2" in changed.stderr


# ------------------------------------------------------------------------------------------
# Bad input: one line, nothing that looks finished
# ------------------------------------------------------------------------------------------
def test_a_domain_with_one_example_is_refused_before_any_folder(sample, tmp_path):
    rows = {"a": ["good film\tpos", "bad film\tneg", "fine plot\tpos", "dull plot\tneg"],
            "b": ["good book\tpos"]}
    for domain, train in rows.items():
        (tmp_path / "data" / domain).mkdir(parents=True)
        for split, lines in (("train", train), ("dev", ["good\tpos", "bad\tneg"]),
                             ("test", ["fine\tpos", "dull\tneg"])):
            (tmp_path / "data" / domain / f"{split}.tsv").write_text(
                "text\tlabel\n" + "\n".join(lines) + "\n")
    out = tmp_path / "teacher"
    argv = meta_teacher_argv(sample, out)
    argv[argv.index("--task") + 1] = "custom"
    argv[argv.index("--data_dir") + 1] = str(tmp_path / "data")
    argv[argv.index("--domain") + 1] = "a"
    result = run_script("train_meta_teacher.py", argv)
    one_line_error(result, "domain 'b' has 1 training example(s)")
    assert not out.exists()


def one_line_error(result, words):
    """Exit status 1, no traceback, one error line (after any log lines) holding ``words``."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and words in errors[0], result.stderr


def test_a_missing_or_wrong_meta_teacher_is_one_line(sample, tmp_path, meta_teacher):
    import shutil
    import train_domain
    one_line_error(run_script("finetune_metakd.py", student_argv(
        sample, tmp_path / "nowhere", tmp_path / "s1")), "no such teacher")
    plain = tmp_path / "plain"
    assert train_domain.main(tiny_teacher_args(sample, plain, 2, "--do_train")) == 0
    one_line_error(run_script("finetune_metakd.py", student_argv(sample, plain, tmp_path / "s2")),
                   "not a meta-teacher")
    partial = tmp_path / "partial"
    shutil.copytree(meta_teacher, partial)
    os.remove(partial / metakd.INSTANCE_WEIGHTS_FILE)
    one_line_error(run_script("finetune_metakd.py", student_argv(sample, partial,
                                                                 tmp_path / "s3")),
                   "instance_weights.pt: missing")
    one_line_error(run_script("finetune_metakd.py", student_argv(
        sample, meta_teacher, tmp_path / "s4", "--train_ratio", "0.5")), "other training examples")
    for name in ("s1", "s2", "s3", "s4"):
        assert not (tmp_path / name).exists(), name
