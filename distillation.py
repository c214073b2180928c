"""Distillation losses (REFERENCE.md section 4).

* ``soft_cross_entropy``: SCE of the released code (mean over batch AND classes, no tau^2).
* ``attention_mse``: MSE of attention scores with every entry <= -100 zeroed on both sides,
  which removes the -10000 mask of padded keys.
* ``teacher_layer_for``: the uniform layer map (student block i learns from teacher block
  i * L_t / L_s; the embedding output from the embedding output).
* ``layer_losses``: per-level (embedding, then each student block) distillation terms.
* ``tinybert_kd_loss``: the stage-2 objective, returned as a named dict.
* ``DomainRelationalGraph``: one two-layer graph attention network per level plus the
  hierarchical compare-aggregate; prototypes (levels, D, H) -> domain weights (levels, D).
* ``domain_prototypes`` / ``hrkd_loss``: the stage-4 objective.

Importing this module has no side effects.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Attention entries at or below this are masked positions (the mask adds -10000).
MASKED_SCORE_THRESHOLD = -100.0


def full_precision(tensor):
    """Losses are computed in (at least) fp32, also under bf16/fp16 autocast."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0):
    """mean over batch and classes of -softmax(t / tau) * log_softmax(s / tau)."""
    targets = torch.softmax(full_precision(teacher_logits) / temperature, dim=-1)
    log_probs = torch.log_softmax(full_precision(student_logits) / temperature, dim=-1)
    return (-targets * log_probs).mean()


def zero_masked_scores(scores):
    return torch.where(scores <= MASKED_SCORE_THRESHOLD, torch.zeros_like(scores), scores)


def attention_mse(student_scores, teacher_scores):
    return F.mse_loss(zero_masked_scores(full_precision(student_scores)),
                      zero_masked_scores(full_precision(teacher_scores)))


def hidden_mse(student_hidden, teacher_hidden):
    return F.mse_loss(full_precision(student_hidden), full_precision(teacher_hidden))


def teacher_layer_for(student_layers: int, teacher_layers: int) -> List[int]:
    """Teacher block (1-based) each student block i = 1..L_s learns from: i * L_t / L_s."""
    if teacher_layers % student_layers:
        raise ValueError(f"teacher layers ({teacher_layers}) must be a multiple of student "
                         f"layers ({student_layers}) for the uniform layer map")
    step = teacher_layers // student_layers
    return [i * step for i in range(1, student_layers + 1)]


def frozen_teacher_outputs(teacher, input_ids, segment_ids, attention_mask, domain,
                           student_layers: int):
    """What distillation reads from a frozen teacher, computed under inference mode.

    Only the mapped blocks build attention scores (the others run the fused kernel), and only
    the tensors the losses read are kept. Hidden states and logits are cloned out of inference
    mode so autograd may save them as targets; the scores are not (attention_mse rebuilds them
    with torch.where before any saved use), which spares a (B, heads, T, T) copy per layer.
    The values are those of a plain forward pass.
    """
    mapped = teacher_layer_for(student_layers, teacher.config.num_hidden_layers)
    # torch.compile cannot trace inference mode; no_grad gives the same values there.
    frozen = torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()
    with frozen:
        out = teacher(input_ids, segment_ids, attention_mask, domain=domain,
                      score_layers=[j - 1 for j in mapped])
    kept = {0, *mapped}
    hidden = [h.clone() if i in kept else None for i, h in enumerate(out.hidden_states)]
    return type(out)(out.logits.clone(), hidden, list(out.attention_scores))


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


# --------------------------------------------------------------------------------------------
# The domain-relational graph and the hierarchical compare-aggregate (HRKD, section 4)
# --------------------------------------------------------------------------------------------
XAVIER_GAIN = 1.414


def graph_attention(projected, a, dropout: float, training: bool, slope: float = 0.2):
    """Attention of K heads at once on a fully connected graph (self loops included).

    ``projected`` (K, N, F) = x @ W per head; ``a`` (K, 2F, 1). e[i, j] = LeakyReLU(a[:F] . h_i
    + a[F:] . h_j); alpha = softmax over j, then dropout; returns ELU(alpha @ h), (K, N, F).
    """
    width = projected.shape[-1]
    source = projected @ a[:, :width]                              # (K, N, 1)
    neighbour = projected @ a[:, width:]                           # (K, N, 1)
    scores = F.leaky_relu(source + neighbour.transpose(1, 2), slope)  # (K, N, N)
    alpha = F.dropout(torch.softmax(scores, dim=-1), dropout, training)
    return F.elu(alpha @ projected)


class GraphAttentionLayer(nn.Module):
    """One graph-attention head's parameters: ``W`` (in x out, applied as x @ W) and ``a``
    (2 out x 1: the first half scores the source node, the second half the neighbour), Xavier
    uniform with gain 1.414. Names and shapes follow REFERENCE.md section 6."""

    def __init__(self, in_features: int, out_features: int, dropout: float):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_features, out_features))
        self.a = nn.Parameter(torch.empty(2 * out_features, 1))
        nn.init.xavier_uniform_(self.W, gain=XAVIER_GAIN)
        nn.init.xavier_uniform_(self.a, gain=XAVIER_GAIN)
        self.dropout = dropout

    def forward(self, x):
        return graph_attention((x @ self.W)[None], self.a[None], self.dropout, self.training)[0]


class GraphAttentionNetwork(nn.Module):
    """Two GAT layers: ``heads`` heads H -> H (concatenated), then one head heads*H -> 1.

    The first layer's heads run as one batched product (same math as a loop over heads)."""

    def __init__(self, width: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.dropout = dropout
        self.attentions = nn.ModuleList(GraphAttentionLayer(width, width, dropout)
                                        for _ in range(heads))
        self.out_att = GraphAttentionLayer(heads * width, 1, dropout)

    def forward(self, x):
        x = F.dropout(x, self.dropout, self.training)
        weights = torch.stack([head.W for head in self.attentions])        # (K, H, H)
        vectors = torch.stack([head.a for head in self.attentions])        # (K, 2H, 1)
        heads = graph_attention(torch.matmul(x, weights), vectors, self.dropout,
                                self.training)                               # (K, N, H)
        x = heads.transpose(0, 1).reshape(x.shape[0], -1)                  # concatenated
        x = F.dropout(x, self.dropout, self.training)
        return self.out_att(x).squeeze(-1)                                  # (N,)


def compare_aggregate(prototypes, level: int, reference_matrix, compare_matrices):
    """The hierarchical compare-aggregate of ``level``: each domain's mix of its prototypes of
    levels 0..level, and the attention over them.

    R = softmax_rows(P_l A P_l^T) P_l; s[d, k] = P[k, d] C_d R[d]; a = softmax_k(s).
    ``reference_matrix`` is A (H, H), ``compare_matrices`` the C_d (D, H, H)."""
    current = prototypes[level]                                               # (D, H)
    affinity = torch.softmax(current @ reference_matrix @ current.T, dim=-1)
    reference = affinity @ current                                            # (D, H)
    below = prototypes[:level + 1].transpose(0, 1)                            # (D, l+1, H)
    compared = torch.einsum("dkh,dhg,dg->dk", below, compare_matrices, reference)
    attention = torch.softmax(compared, dim=-1)                               # (D, l+1)
    return torch.einsum("dk,dkh->dh", attention, below), attention


def _hierarchy_parameters(module: nn.Module, levels: int, num_domains: int, width: int):
    """``w_attn_1`` (levels, H, H) and ``w_attn_2`` (levels, D, H, H), Xavier gain 1.414."""
    module.w_attn_1 = nn.Parameter(torch.empty(levels, width, width))
    module.w_attn_2 = nn.Parameter(torch.empty(levels, num_domains, width, width))
    for level in range(levels):
        nn.init.xavier_uniform_(module.w_attn_1.data[level], gain=XAVIER_GAIN)
        for domain in range(num_domains):
            nn.init.xavier_uniform_(module.w_attn_2.data[level, domain], gain=XAVIER_GAIN)


class DomainRelationalGraph(nn.Module):
    """Prototypes P (levels, D, H) -> domain weights w (levels, D), each level summing to 1.

    ``hierarchical``: level l >= 1 feeds each domain a mix of its prototypes of levels 0..l,
    weighted by a compare-aggregate against reference prototypes R = softmax(P_l A_l P_l^T) P_l.
    Names: ``all_gnn.<l>``, ``w_attn_1`` (levels, H, H), ``w_attn_2`` (levels, D, H, H); entry 0
    of the two matrices is unused (level 0 has nothing below it).
    """

    def __init__(self, levels: int, num_domains: int, width: int, heads: int = 8,
                 dropout: float = 0.1, hierarchical: bool = True):
        super().__init__()
        self.levels, self.num_domains, self.hierarchical = levels, num_domains, hierarchical
        self.all_gnn = nn.ModuleList(GraphAttentionNetwork(width, heads, dropout)
                                     for _ in range(levels))
        _hierarchy_parameters(self, levels, num_domains, width)

    def compare_aggregate(self, prototypes, level: int):
        """Graph input of ``level`` and the attention over levels 0..level of each domain."""
        return compare_aggregate(prototypes, level, self.w_attn_1[level], self.w_attn_2[level])

    def forward(self, prototypes):
        """Returns (weights (levels, D), list of per-level hierarchical attentions or None)."""
        weights, hierarchy = [], []
        for level in range(self.levels):
            graph_input, attention = prototypes[level], None
            if self.hierarchical and level > 0:
                graph_input, attention = self.compare_aggregate(prototypes, level)
            weights.append(torch.softmax(self.all_gnn[level](graph_input), dim=0))
            hierarchy.append(attention)
        return torch.stack(weights), hierarchy


class DomainScorer(nn.Module):
    """Prototypes P (levels, D, H) -> domain weights w (levels, D) from each domain's OWN score.

    s[l, d] = u_l . P[l, d] / ||P[l, d]|| + b[l, d]   (the hierarchical mix in place of P[l, d]
    for levels >= 1 when ``hierarchical``); w[l] = (1 - floor) softmax(s[l] / temperature)
    + floor / D. Unlike the released graph, no score is an average over the other domains, so
    the weights can single a domain out; ``floor`` keeps every domain above floor / D so none
    takes all the weight by accident. u and b start at 0: the weights start exactly uniform.
    """

    def __init__(self, levels: int, num_domains: int, width: int, hierarchical: bool = True,
                 temperature: float = 1.0, floor: float = 0.25):
        super().__init__()
        if temperature <= 0 or not 0.0 <= floor < 1.0:
            raise ValueError(f"scorer temperature must be positive and floor in [0, 1), got "
                             f"{temperature} and {floor}")
        self.levels, self.num_domains, self.hierarchical = levels, num_domains, hierarchical
        self.temperature, self.floor = temperature, floor
        self.direction = nn.Parameter(torch.zeros(levels, width))
        self.logits = nn.Parameter(torch.zeros(levels, num_domains))
        if hierarchical:
            _hierarchy_parameters(self, levels, num_domains, width)

    def forward(self, prototypes):
        """Returns (weights (levels, D), list of per-level hierarchical attentions or None)."""
        weights, hierarchy = [], []
        for level in range(self.levels):
            scored, attention = prototypes[level], None
            if self.hierarchical and level > 0:
                scored, attention = compare_aggregate(prototypes, level, self.w_attn_1[level],
                                                      self.w_attn_2[level])
            unit = scored / scored.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            score = unit @ self.direction[level] + self.logits[level]
            soft = torch.softmax(score / self.temperature, dim=0)
            weights.append((1.0 - self.floor) * soft + self.floor / self.num_domains)
            hierarchy.append(attention)
        return torch.stack(weights), hierarchy


def domain_prototypes(hidden_states_per_domain: Sequence[Sequence[torch.Tensor]]):
    """P[l, d]: mean over batch and sequence (padding included) of level l for domain d."""
    return torch.stack([torch.stack([full_precision(h).mean(dim=(0, 1)) for h in levels])
                        for levels in hidden_states_per_domain], dim=1)       # (levels, D, H)


def hrkd_loss(student_outs, teacher_outs, weights=None, hidden_ratio: float = 1.0,
              pred_ratio: float = 1.0, temperature: float = 1.0) -> Dict[str, torch.Tensor]:
    """The stage-4 objective (REFERENCE.md section 4).

    loss_d = hidden_ratio * (w[0,d] MSE(emb) + sum_i w[i,d] (MSE(att) + MSE(hid)))
             + pred_ratio * SCE / D;  loss = sum_d loss_d.
    ``weights`` None (no graph): every w is 1 and the prediction term is not divided by D.
    ``student_outs`` / ``teacher_outs``: one ModelOutput per domain.
    """
    num_domains = len(student_outs)
    hidden_total, pred_total = 0.0, 0.0
    for d, (student_out, teacher_out) in enumerate(zip(student_outs, teacher_outs)):
        levels = torch.stack(layer_losses(student_out, teacher_out))
        if weights is not None:
            levels = levels * weights[:, d]
        hidden_total = hidden_total + levels.sum()
        prediction = soft_cross_entropy(student_out.logits, teacher_out.logits, temperature)
        pred_total = pred_total + (prediction / num_domains if weights is not None else prediction)
    loss = hidden_ratio * hidden_total + pred_ratio * pred_total
    return {"loss": loss, "hidden_loss": hidden_total.detach(), "pred_loss": pred_total.detach()}
