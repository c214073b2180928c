"""The HRKD objective against a straightforward loop written here, on tiny tensors."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import objectives
import weighting
import runtime
import training
import utils
from distillation import (DomainRelationalGraph, domain_prototypes, hrkd_loss, layer_losses,
                          soft_cross_entropy)
from modeling import ModelOutput

LEVELS, DOMAINS, WIDTH, HEADS = 3, 4, 6, 8


DISTILL = objectives.DistillConfig(hidden_ratio=1.0, pred_ratio=1.0, temperature=1.0)


def reference_gat_layer(x, W, a):
    h = x @ W
    n, width = h.shape
    scores = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            scores[i, j] = F.leaky_relu(h[i] @ a[:width, 0] + h[j] @ a[width:, 0], 0.2)
    alpha = torch.softmax(scores, dim=1)
    return F.elu(torch.stack([sum(alpha[i, j] * h[j] for j in range(n)) for i in range(n)]))


def reference_weights(graph, prototypes, hierarchical):
    weights = []
    for level in range(LEVELS):
        current = prototypes[level]
        if hierarchical and level > 0:
            affinity = torch.softmax(current @ graph.w_attn_1[level] @ current.T, dim=1)
            reference = affinity @ current
            rows = []
            for d in range(DOMAINS):
                s = torch.stack([prototypes[k, d] @ graph.w_attn_2[level, d] @ reference[d]
                                 for k in range(level + 1)])
                a = torch.softmax(s, dim=0)
                rows.append(sum(a[k] * prototypes[k, d] for k in range(level + 1)))
            current = torch.stack(rows)
        gnn = graph.all_gnn[level]
        hidden = torch.cat([reference_gat_layer(current, head.W, head.a)
                            for head in gnn.attentions], dim=1)
        out = reference_gat_layer(hidden, gnn.out_att.W, gnn.out_att.a)[:, 0]
        weights.append(torch.softmax(out, dim=0))
    return torch.stack(weights)


def fake_outputs(seed, batch=2, length=3, student=True):
    generator = torch.Generator().manual_seed(seed)
    blocks = 2 if student else 4
    # A per-output offset makes the domains' prototypes differ, as real domains' do.
    hidden = [torch.randn(batch, length, WIDTH, generator=generator) * 0.3
              + torch.randn(WIDTH, generator=generator) for _ in range(blocks + 1)]
    scores = [torch.randn(batch, 2, length, length, generator=generator)
              for _ in range(blocks)]
    scores[0][:, :, :, -1] = -10000.0
    logits = torch.randn(batch, 3, generator=generator)
    if student:
        hidden = [h.requires_grad_() for h in hidden]
    return ModelOutput(logits, hidden, scores)


@pytest.fixture
def graph():
    torch.manual_seed(0)
    graph = DomainRelationalGraph(LEVELS, DOMAINS, WIDTH, heads=HEADS, dropout=0.1)
    with torch.no_grad():  # moderate scale so no softmax saturates and the test is sensitive
        graph.w_attn_1.mul_(0.3)
        graph.w_attn_2.mul_(0.3)
    return graph.eval()


@pytest.mark.parametrize("hierarchical", [True, False])
def test_graph_weights_match_reference_loop(graph, hierarchical):
    graph.hierarchical = hierarchical
    prototypes = torch.randn(LEVELS, DOMAINS, WIDTH)
    weights, hierarchy = graph(prototypes)
    expected = reference_weights(graph, prototypes, hierarchical)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(LEVELS))
    assert (hierarchy[1] is not None) == hierarchical and hierarchy[0] is None
    if hierarchical:
        assert hierarchy[2].shape == (DOMAINS, 3)
        assert torch.allclose(hierarchy[2].sum(dim=1), torch.ones(DOMAINS))
    assert not torch.allclose(weights, torch.full_like(weights, 1 / DOMAINS), atol=1e-4)


@pytest.mark.parametrize("use_graph,hierarchical", [(True, True), (True, False), (False, False)])
def test_hrkd_loss_matches_reference_loop(graph, use_graph, hierarchical):
    graph.hierarchical = hierarchical
    students = [fake_outputs(d) for d in range(DOMAINS)]
    teachers = [fake_outputs(100 + d, student=False) for d in range(DOMAINS)]
    prototypes = domain_prototypes([s.hidden_states for s in students])
    assert prototypes.shape == (LEVELS, DOMAINS, WIDTH)
    assert torch.allclose(prototypes[1, 2], students[2].hidden_states[1].mean(dim=(0, 1)))
    weights = graph(prototypes)[0] if use_graph else None
    losses = hrkd_loss(students, teachers, weights, hidden_ratio=0.7, pred_ratio=1.3,
                       temperature=2.0)
    expected = 0.0
    for d in range(DOMAINS):
        levels = layer_losses(students[d], teachers[d])
        if use_graph:
            w = reference_weights(graph, prototypes, hierarchical)
            hidden = sum(w[l, d] * levels[l] for l in range(LEVELS))
            pred = soft_cross_entropy(students[d].logits, teachers[d].logits, 2.0) / DOMAINS
        else:
            hidden = sum(levels)
            pred = soft_cross_entropy(students[d].logits, teachers[d].logits, 2.0)
        expected = expected + 0.7 * hidden + 1.3 * pred
    assert losses["loss"].item() == pytest.approx(float(expected.detach()), rel=1e-5)


def test_gradients_reach_student_through_the_weights(graph):
    """Released set-up: the graph in training mode (its dropout active, the same masks in both
    passes). In float64, so that the path, small because the weights stay close to 1/D, stands
    far above rounding."""
    graph = graph.double().train()

    def as_double(out, requires_grad):
        hidden = [h.detach().double().requires_grad_(requires_grad) for h in out.hidden_states]
        return ModelOutput(out.logits.double(), hidden, [s.double() for s in out.attention_scores])

    students = [as_double(fake_outputs(d), True) for d in range(DOMAINS)]
    # Domains whose layer losses differ widely, so that moving weight between them matters.
    teachers = [as_double(fake_outputs(100 + d, student=False), False) for d in range(DOMAINS)]
    teachers = [ModelOutput(t.logits, [h * 4 * (d + 1) for h in t.hidden_states],
                            t.attention_scores) for d, t in enumerate(teachers)]

    def grads(detach_weights):
        torch.manual_seed(7)
        for s in students:
            for h in s.hidden_states:
                h.grad = None
        weights, _ = graph(domain_prototypes([s.hidden_states for s in students]))
        if detach_weights:
            weights = weights.detach()
        hrkd_loss(students, teachers, weights)["loss"].backward()
        return torch.cat([h.grad.flatten() for s in students for h in s.hidden_states])

    through_weights = grads(False) - grads(True)
    assert through_weights.abs().max() > 1e-9


def test_graph_parameter_names_and_shapes():
    levels, domains, width = 5, 4, 16
    graph = DomainRelationalGraph(levels, domains, width)
    shapes = {name: tuple(p.shape) for name, p in graph.named_parameters()}
    expected = {"w_attn_1": (levels, width, width), "w_attn_2": (levels, domains, width, width)}
    for level in range(levels):
        for head in range(8):
            expected[f"all_gnn.{level}.attentions.{head}.W"] = (width, width)
            expected[f"all_gnn.{level}.attentions.{head}.a"] = (2 * width, 1)
        expected[f"all_gnn.{level}.out_att.W"] = (8 * width, 1)
        expected[f"all_gnn.{level}.out_att.a"] = (2, 1)
    assert shapes == expected


def run_graph_training(train_graph: bool, steps: int = 3):
    """The real loop and loss on tiny models; returns the graph's parameters before and after."""
    from conftest import tiny_distillation_configs
    from modeling import BertClassifier
    torch.manual_seed(0)
    teacher_config, student_config = tiny_distillation_configs()
    domains = ["a", "b", "c"]
    teachers = [objectives.freeze(BertClassifier(teacher_config, 2, num_domains=3)) for _ in domains]
    student = BertClassifier(student_config, 2, num_domains=3, fit_size=16)
    args = argparse.Namespace(graph_heads=2, graph_dropout=0.1, hierarchical=True,
                              domain_weighting="graph",
                              train_graph=train_graph, hidden_ratio=1.0, pred_ratio=1.0,
                              temperature=1.0, batch_size=2, seed=1, max_steps=steps,
                              num_train_epochs=1, learning_rate=1e-2, weight_decay=0.01,
                              warmup_proportion=0.0, max_grad_norm=1.0, amp="off",
                              val_freq=1000, eval_batch_size=8, resume=False,
                              no_progress=True, max_nonfinite_steps=3)
    graph = DomainRelationalGraph(3, 3, 16, heads=2, dropout=0.1,
                                  hierarchical=True).requires_grad_(train_graph)
    before = {k: v.clone() for k, v in graph.state_dict().items()}

    def features(n, seed):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(1, 30, (n, 8), generator=g),
                "segment_ids": torch.zeros(n, 8, dtype=torch.long),
                "attention_mask": torch.ones(n, 8, dtype=torch.long),
                "labels": torch.randint(0, 2, (n,), generator=g)}

    train_features = {d: features(6, i) for i, d in enumerate(domains)}
    stage = training.Stage(model=student, domains=domains, fit_domain="a",
                        train_features=train_features, dev_features=train_features,
                        head_of={d: i for i, d in enumerate(domains)},
                        compute_loss=objectives.make_hrkd_loss(
                            teachers, [[0], [1], [2]],
                            weighting.GraphWeighting(graph, train_graph), DISTILL),
                        checkpoint_meta={}, extra_modules={"graph": graph})
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    return before, graph, stage, args, student_before


@pytest.mark.parametrize("train_graph", [False, True])
def test_train_graph_flag_decides_whether_the_graph_moves(tmp_path, train_graph):
    before, graph, stage, args, student_before = run_graph_training(train_graph)
    run = utils.RunDir(str(tmp_path / "run"))
    args.output_dir, args.overwrite = run.path, False
    run.prepare_for_training(args)
    training.train(training.LoopConfig.from_args(args), stage, run, runtime.Distributed())
    after = graph.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    if train_graph:
        assert moved, "--train_graph must update the graph"
    else:
        assert moved == [], "the released recipe never updates the graph"
    student_after = stage.model.state_dict()
    assert any(not torch.equal(student_before[k], student_after[k]) for k in student_before)
    saved = torch.load(run.file("last_checkpoint.pt"), weights_only=True)
    assert all(torch.equal(saved["extra"]["graph"][k], after[k]) for k in after)


def test_shared_teacher_forward_equals_separate_forwards():
    """Domains served by one teacher get one forward pass: the loss is the same."""
    before, graph, stage, args, _ = run_graph_training(False)
    from modeling import BertClassifier, BertConfig
    torch.manual_seed(3)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    shared, other = (objectives.freeze(BertClassifier(config, 2, num_domains=3)) for _ in range(2))
    student = stage.model.eval()
    graph.eval()
    batches = [{name: tensor[:2] for name, tensor in stage.train_features[d].items()}
               for d in stage.domains]
    strategy = weighting.GraphWeighting(graph, False)
    separate = objectives.make_hrkd_loss([shared, other, shared], [[0], [1], [2]], strategy,
                                         DISTILL)
    grouped = objectives.make_hrkd_loss([shared, other], [[0, 2], [1]], strategy, DISTILL)
    a, b = separate(student, batches)["loss"], grouped(student, batches)["loss"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_load_teachers_groups_identical_checkpoints(tmp_path):
    from modeling import BertClassifier
    from conftest import tiny_config
    paths = []
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        torch.manual_seed(seed)
        model = BertClassifier(tiny_config(), 2, num_domains=3)
        path = tmp_path / f"best_model_{name}.bin"
        torch.save({"state_dict": model.state_dict(), "config": model.config.to_dict(),
                    "model_args": model.model_args()}, path)
        paths.append(str(path))
    teachers, groups = objectives.load_teachers(paths, torch.device("cpu"))
    assert len(teachers) == 2 and groups == [[0, 2], [1]]


# ------------------------------------------------------------------------------------------
# Domain weightings: uniform control, the oversmoothing property, the meta-learned graph
# ------------------------------------------------------------------------------------------
def test_uniform_weighting_is_exactly_one_over_d(graph):
    students = [fake_outputs(d) for d in range(DOMAINS)]
    weights, hierarchy = weighting.UniformWeighting(LEVELS, DOMAINS, "cpu").weights(students)
    assert torch.equal(weights, torch.full((LEVELS, DOMAINS), 1.0 / DOMAINS))
    assert hierarchy == [None] * LEVELS


def test_graph_oversmooths_near_identical_prototypes():
    """Dropout 0, prototypes that differ by 1e-3: every level's weights are 1/D."""
    torch.manual_seed(0)
    graph = DomainRelationalGraph(LEVELS, DOMAINS, WIDTH, heads=HEADS, dropout=0.0)
    base = torch.randn(LEVELS, 1, WIDTH)
    prototypes = base + 1e-3 * torch.randn(LEVELS, DOMAINS, WIDTH)
    weights, _ = graph(prototypes)
    assert torch.allclose(weights, torch.full_like(weights, 1.0 / DOMAINS), atol=1e-5)


def meta_setup(meta_every):
    before, graph, stage, args, student_before = run_graph_training(False)
    args.domain_weighting, args.meta_lr, args.meta_every = "meta", 1e-2, meta_every
    args.meta_virtual_lr, args.meta_objective = 1e-1, "distill"
    graph.requires_grad_(True)
    from modeling import BertClassifier, BertConfig
    torch.manual_seed(5)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    teachers = [objectives.freeze(BertClassifier(config, 2, num_domains=3)) for _ in range(3)]
    groups = [[0], [1], [2]]
    meta = weighting.MetaGraphLearner(
        graph, teachers, groups, [stage.train_features[d] for d in stage.domains], DISTILL,
        weighting.MetaConfig(lr=1e-2, every=meta_every, virtual_lr=1e-1, objective="distill",
                              batch_size=args.batch_size, seed=args.seed), torch.device("cpu"))
    stage.compute_loss = objectives.make_hrkd_loss(teachers, groups,
                                                   weighting.MetaGraphWeighting(graph, meta),
                                                   DISTILL)
    stage.extra_state = {"meta": meta}
    stage.optimise_extra = False
    return before, graph, stage, args, meta, teachers, groups


@pytest.mark.parametrize("meta_every,moves", [(1, True), (1000, False)])
def test_meta_graph_moves_only_by_its_meta_step(tmp_path, meta_every, moves):
    """With no meta step in the run the graph stays put although the weighted loss is
    optimised: it is not in the student's optimiser (that version of the code fails here)."""
    before, graph, stage, args, meta, _, _ = meta_setup(meta_every)
    run = utils.RunDir(str(tmp_path / "run"))
    args.output_dir, args.overwrite = run.path, False
    run.prepare_for_training(args)
    training.train(training.LoopConfig.from_args(args), stage, run, runtime.Distributed())
    after = graph.state_dict()
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == moves
    assert meta.calls == args.max_steps


def test_meta_step_leaves_student_parameters_untouched():
    _, graph, stage, args, meta, teachers, groups = meta_setup(1)
    student = stage.model
    batches = [{k: v[:2] for k, v in stage.train_features[d].items()} for d in stage.domains]
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    graph_before = {k: v.clone() for k, v in graph.state_dict().items()}
    targets = objectives.teacher_outputs(teachers, groups, batches, 2)
    objective = meta.step(student, batches, targets)
    assert torch.isfinite(objective)
    assert all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())
    assert any(not torch.equal(graph_before[k], v) for k, v in graph.state_dict().items())


def test_frozen_teacher_in_bf16_is_bit_identical_under_autocast():
    import copy
    from modeling import BertClassifier, BertConfig
    from distillation import frozen_teacher_outputs
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    plain = objectives.freeze(BertClassifier(config, 2))
    cast = objectives.freeze(copy.deepcopy(plain), "bf16")
    assert cast.encoder[0].ffn.dense1.weight.dtype == torch.bfloat16
    assert cast.embeddings.layernorm.weight.dtype == torch.float32
    ids = torch.randint(1, 30, (3, 8))
    inputs = (ids, torch.zeros_like(ids), torch.ones_like(ids))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = frozen_teacher_outputs(plain, *inputs, None, 2)
        b = frozen_teacher_outputs(cast, *inputs, None, 2)
    assert torch.equal(a.logits, b.logits)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x is None and y is None) or torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# The meta-learned domain scorer (issue: a weighting that can move)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hierarchical", [True, False])
def test_scorer_starts_uniform_sums_to_one_and_keeps_its_floor(hierarchical):
    from distillation import DomainScorer
    torch.manual_seed(0)
    scorer = DomainScorer(LEVELS, DOMAINS, WIDTH, hierarchical=hierarchical, floor=0.2)
    prototypes = torch.randn(LEVELS, DOMAINS, WIDTH)
    weights, hierarchy = scorer(prototypes)
    assert torch.allclose(weights, torch.full((LEVELS, DOMAINS), 1.0 / DOMAINS))
    assert (hierarchy[1] is not None) == hierarchical
    with torch.no_grad():
        scorer.logits[:, 0] = 100.0  # one domain scored far above the others
    weights, _ = scorer(prototypes)
    assert torch.allclose(weights.sum(dim=1), torch.ones(LEVELS))
    assert weights.min() >= 0.2 / DOMAINS - 1e-6


def test_meta_scorer_moves_away_from_uniform_and_spares_the_student():
    """Domain 2's held-out gold labels contradict the student's predictions (its gold loss is
    much larger than the others'): a few meta steps make the weights non-uniform, each level
    still summing to 1, and the student's real parameters are untouched."""
    from distillation import DomainScorer
    _, _, stage, args, _, teachers, groups = meta_setup(1)
    student = stage.model
    features = [dict(stage.train_features[d]) for d in stage.domains]
    with torch.no_grad():
        for index, batch in enumerate(features):
            predicted = student(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                                domain=torch.full((batch["labels"].shape[0],), index)).logits
            agree = predicted.argmax(-1)
            batch["labels"] = 1 - agree if index == 2 else agree
    scorer = DomainScorer(3, 3, 16, hierarchical=True, floor=0.1)
    meta = weighting.MetaGraphLearner(
        scorer, teachers, groups, features, DISTILL,
        weighting.MetaConfig(lr=0.5, every=1, virtual_lr=1.0, objective="gold",
                              batch_size=4, seed=0), torch.device("cpu"))
    strategy = weighting.MetaScorerWeighting(scorer, meta)
    batches = [{k: v[:2] for k, v in f.items()} for f in features]
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    for _ in range(5):
        targets = objectives.teacher_outputs(teachers, groups, batches, 2)
        strategy.before_step(student, batches, targets)
    weights, _ = strategy.weights(objectives.student_outputs(student, batches))
    assert torch.allclose(weights.sum(dim=1), torch.ones(3), atol=1e-6)
    assert (weights - 1.0 / 3).abs().max() > 1e-3, weights
    assert all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())
