"""TinyBERT-KD loss against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from distillation import (attention_mse, layer_losses, soft_cross_entropy, teacher_layer_for,
                          tinybert_kd_loss)
from modeling import ModelOutput


def test_soft_cross_entropy_by_hand():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # teacher probabilities: [0.5, 0.5] and [0.75, 0.25]
    ls0 = [1 - math.log(math.e + 1), -math.log(math.e + 1)]
    ls1 = [-math.log(1 + math.e ** 2), 2 - math.log(1 + math.e ** 2)]
    expected = -(0.5 * ls0[0] + 0.5 * ls0[1] + 0.75 * ls1[0] + 0.25 * ls1[1]) / 4
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    # temperature divides both logit sets; no tau^2 factor
    expected_t2 = soft_cross_entropy(student / 2, teacher / 2).item()
    assert soft_cross_entropy(student, teacher, 2.0).item() == pytest.approx(expected_t2, abs=1e-7)


def test_attention_mse_zeroes_masked_entries():
    teacher = torch.tensor([[1.0, -10000.0], [2.0, -9999.0]])
    student = torch.tensor([[3.0, -10001.5], [-100.0, 5.0]])
    # masked (<= -100) entries become 0 on both sides: student -100 counts as 0 too
    expected = ((3 - 1) ** 2 + 0 + (0 - 2) ** 2 + (5 - 0) ** 2) / 4
    assert attention_mse(student, teacher).item() == pytest.approx(expected)


def test_layer_map():
    assert teacher_layer_for(4, 12) == [3, 6, 9, 12]
    assert teacher_layer_for(2, 4) == [2, 4]
    with pytest.raises(ValueError):
        teacher_layer_for(5, 12)


def fake_output(hidden, scores, logits):
    return ModelOutput(torch.tensor(logits), [torch.tensor(h) for h in hidden],
                       [torch.tensor(s) for s in scores])


def test_tinybert_kd_loss_by_hand():
    # teacher: 4 blocks; student: 2 blocks -> student 1 <- teacher 2, student 2 <- teacher 4
    teacher = fake_output(hidden=[[[0.0, 1.0]], [[9.0, 9.0]], [[1.0, 1.0]], [[9.0, 9.0]],
                                  [[2.0, 0.0]]],
                          scores=[[[[7.0, 7.0]]], [[[1.0, -10000.0]]], [[[7.0, 7.0]]],
                                  [[[0.5, 0.5]]]],
                          logits=[[0.0, 0.0]])
    student = fake_output(hidden=[[[1.0, 1.0]], [[1.0, 3.0]], [[2.0, 2.0]]],
                          scores=[[[[2.0, -10000.0]]], [[[0.5, 1.5]]]],
                          logits=[[1.0, 0.0]])
    emb = ((1 - 0) ** 2 + (1 - 1) ** 2) / 2                  # 0.5
    level1 = ((2 - 1) ** 2 + 0) / 2 + ((1 - 1) ** 2 + (3 - 1) ** 2) / 2   # 0.5 + 2
    level2 = (0 + 1) / 2 + (0 + 4) / 2                       # 0.5 + 2
    assert [v.item() for v in layer_losses(student, teacher)] == pytest.approx(
        [emb, level1, level2])
    sce = -(0.5 * (1 - math.log(1 + math.e)) + 0.5 * (-math.log(1 + math.e))) / 2
    losses = tinybert_kd_loss(student, teacher, hidden_ratio=2.0, pred_ratio=3.0)
    assert losses["loss"].item() == pytest.approx(2 * (emb + level1 + level2) + 3 * sce, abs=1e-6)
    assert losses["hidden_loss"].item() == pytest.approx(emb + level1 + level2)
    assert losses["pred_loss"].item() == pytest.approx(sce, abs=1e-6)


def test_kd_loss_gradients_reach_only_student():
    torch.manual_seed(0)
    student_hidden = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(3)]
    student = ModelOutput(torch.randn(2, 3, requires_grad=True), student_hidden,
                          [torch.randn(2, 1, 3, 3, requires_grad=True) for _ in range(2)])
    teacher = ModelOutput(torch.randn(2, 3), [torch.randn(2, 3, 4) for _ in range(5)],
                          [torch.randn(2, 1, 3, 3) for _ in range(4)])
    tinybert_kd_loss(student, teacher)["loss"].backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in student_hidden)
