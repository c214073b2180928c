"""Distillation losses (REFERENCE.md section 4).

* ``soft_cross_entropy``: SCE of the released code (mean over batch AND classes, no tau^2).
* ``attention_mse``: MSE of attention scores with every entry <= -100 zeroed on both sides,
  which removes the -10000 mask of padded keys.
* ``teacher_layer_for``: the uniform layer map (student block i learns from teacher block
  i * L_t / L_s; the embedding output from the embedding output).
* ``layer_losses``: per-level (embedding, then each student block) distillation terms.
* ``tinybert_kd_loss``: the stage-2 objective, returned as a named dict.

Importing this module has no side effects.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

# Attention entries at or below this are masked positions (the mask adds -10000).
MASKED_SCORE_THRESHOLD = -100.0


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0):
    """mean over batch and classes of -softmax(t / tau) * log_softmax(s / tau)."""
    targets = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    log_probs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (-targets * log_probs).mean()


def zero_masked_scores(scores):
    return torch.where(scores <= MASKED_SCORE_THRESHOLD, torch.zeros_like(scores), scores)


def attention_mse(student_scores, teacher_scores):
    return F.mse_loss(zero_masked_scores(student_scores.float()),
                      zero_masked_scores(teacher_scores.float()))


def hidden_mse(student_hidden, teacher_hidden):
    return F.mse_loss(student_hidden.float(), teacher_hidden.float())


def teacher_layer_for(student_layers: int, teacher_layers: int) -> List[int]:
    """Teacher block (1-based) each student block i = 1..L_s learns from: i * L_t / L_s."""
    if teacher_layers % student_layers:
        raise ValueError(f"teacher layers ({teacher_layers}) must be a multiple of student "
                         f"layers ({student_layers}) for the uniform layer map")
    step = teacher_layers // student_layers
    return [i * step for i in range(1, student_layers + 1)]


def mapped_score_layers(student_layers: int, teacher_layers: int) -> List[int]:
    """0-based teacher blocks whose attention scores distillation reads."""
    return [j - 1 for j in teacher_layer_for(student_layers, teacher_layers)]


def layer_losses(student_out, teacher_out) -> List[torch.Tensor]:
    """Distillation term per level: [MSE(emb), MSE(att_1) + MSE(h_1), ..., for each student block].

    Outputs are ``modeling.ModelOutput``; the student's hidden states are the fitted ones.
    """
    student_layers = len(student_out.attention_scores)
    teacher_layers = len(teacher_out.attention_scores)
    levels = [hidden_mse(student_out.hidden_states[0], teacher_out.hidden_states[0])]
    for i, j in enumerate(teacher_layer_for(student_layers, teacher_layers), start=1):
        levels.append(attention_mse(student_out.attention_scores[i - 1],
                                    teacher_out.attention_scores[j - 1])
                      + hidden_mse(student_out.hidden_states[i], teacher_out.hidden_states[j]))
    return levels


def tinybert_kd_loss(student_out, teacher_out, hidden_ratio: float = 1.0,
                     pred_ratio: float = 1.0, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """Stage 2: hidden_ratio * (sum of layer terms) + pred_ratio * SCE; no hard labels."""
    hidden = torch.stack(layer_losses(student_out, teacher_out)).sum()
    prediction = soft_cross_entropy(student_out.logits, teacher_out.logits, temperature)
    return {"loss": hidden_ratio * hidden + pred_ratio * prediction,
            "hidden_loss": hidden.detach(), "pred_loss": prediction.detach()}
