"""Meta-KD (Pan et al., ACL 2021), the HRKD paper's main competitor, as a method of its own.

What EasyNLP's public code computes (``../shared/spec/METAKD.md``, whose section numbers the
names below follow), at this project's sizes and on its splits, with the code's defects B1, B2,
B3, B5, B7/B8 fixed by default (README, "Deviations"):

* A0 ``prototype_scores``: each training example's transferability t_i, from the untuned
  pretrained encoder: e_i = mean of the last layer over positions 1..T-1 ([CLS] dropped, PAD
  kept), the domain prototype p_m, the other domains' prototype q_m (the mean of their
  prototypes), t_i = (cos(e_i, p_d) + cos(e_i, q_d)) / 2. ``instance_weights`` computes them
  once per (encoder, training data) and keeps them beside the feature cache.
* A1 ``DomainBranch``: the meta-teacher's domain branch (true-domain embedding E, dense W_u,
  domain classifier W_g); A2 ``meta_teacher_loss``: t_i * (CE(sentiment) + alpha * CE(domain
  of a randomly permuted batch-mate)), averaged over the batch.
* B1 ``intermediate_loss``: per instance, (hidden MSE + attention-probability MSE + gamma *
  domain-feature MSE), weighted by (1 + t_i) * lambda_i with lambda_i = sigmoid(-(1 - p_y)^2)
  of the teacher, then averaged (``on_batch_mean``: the code's scaling of the batch mean);
  B2 ``prediction_loss``: soft cross-entropy at T = 2 summed over classes, no T^2.
* ``make_meta_teacher_loss`` / ``make_intermediate_loss`` / ``make_prediction_loss``: the loop's
  ``compute_loss`` of stage A and of stage B's two phases (train_meta_teacher.py,
  finetune_metakd.py).

Builds on objectives.py and distillation.py; nothing below imports it but the Meta-KD scripts
and the tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_processing import concat_domain_batches
from distillation import full_precision, teacher_layer_for
from modeling import find_weights_file, model_from_checkpoint, read_checkpoint
from objectives import batch_inputs, freeze, one_teacher_output
from runtime import to_device, unwrap
from utils import RunDir, atomic_torch_save, logger, run_status

# The meta-teacher's run keeps the instance weights of its training data here; stage B reads
# them (so it needs neither the prototype encoder nor the other domains' data).
INSTANCE_WEIGHTS_FILE = "instance_weights.pt"
# Stage B's first phase (B1) runs in this sub-folder of the student's run directory.
INTERMEDIATE_DIR = "intermediate"


@dataclasses.dataclass(frozen=True)
class MetaKDConfig:
    """The weights of Meta-KD's terms (METAKD.md A2, B1, B2)."""

    domain_loss_weight: float = 0.5   # alpha_d of A2 and gamma of B1
    sample_weights: bool = True       # A2: weight each example's loss by t_i
    temperature: float = 2.0          # B2
    on_batch_mean: bool = False       # B1 as the code: the batch-mean loss times mean(w_i)


# --------------------------------------------------------------------------------------------
# A0: prototype instance weights
# --------------------------------------------------------------------------------------------
def tail_mean(hidden: torch.Tensor) -> torch.Tensor:
    """Mean over positions 1..T-1 of (N, T, H) hidden states: [CLS] dropped, [SEP] and PAD kept
    (no mask), as the code pools both the prototype embeddings and the domain branches."""
    return full_precision(hidden[:, 1:]).mean(dim=1)


def prototype_scores(embeddings: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """t_i of every example of every domain from its embedding e_i (one (N_m, H) tensor per
    domain m): (cos(e_i, p_m) + cos(e_i, q_m)) / 2, p_m the mean of domain m's embeddings and
    q_m the mean of the other domains' prototypes (averaged first, the cosine after)."""
    if len(embeddings) < 2:
        raise ValueError("Meta-KD's prototype weights compare each domain with the others: "
                         "they need two or more domains")
    prototypes = torch.stack([e.double().mean(dim=0) for e in embeddings])   # (D, H)
    scores = []
    for domain, e in enumerate(embeddings):
        others = torch.cat([prototypes[:domain], prototypes[domain + 1:]]).mean(dim=0)
        e = e.double()
        own = F.cosine_similarity(e, prototypes[domain][None], dim=-1)
        other = F.cosine_similarity(e, others[None], dim=-1)
        scores.append(((own + other) / 2).float())
    return scores


@torch.inference_mode()
def embed(encoder: nn.Module, features: Dict[str, torch.Tensor], batch_size: int,
          device: torch.device) -> torch.Tensor:
    """e_i of every example: ``tail_mean`` of the encoder's last layer (eval mode, fp32)."""
    was_training = encoder.training
    encoder.eval()
    rows = []
    for start in range(0, features["input_ids"].shape[0], batch_size):
        batch = to_device({k: features[k][start:start + batch_size].long()
                           for k in ("input_ids", "segment_ids", "attention_mask")}, device)
        hidden, _ = unwrap(encoder).encode(batch["input_ids"], batch["segment_ids"],
                                           batch["attention_mask"], score_layers=())
        rows.append(tail_mean(hidden[-1]).cpu())
    encoder.train(was_training)
    return torch.cat(rows)


def inputs_digest(features: Dict[str, torch.Tensor]) -> str:
    """SHA-1 of a split's inputs (ids, segments, masks): which examples, in which order."""
    digest = hashlib.sha1()
    for name in ("input_ids", "segment_ids", "attention_mask"):
        tensor = features[name].contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


def instance_weights(encoder: nn.Module, train: Dict[str, Dict[str, torch.Tensor]],
                     cache_dir: str, batch_size: int, device: torch.device,
                     is_main: bool = True) -> dict:
    """{"domains", "weights": {domain: (N,) t_i}, "inputs": {domain: inputs_digest}} of the
    training data ``train`` (every domain of the task), computed once per (encoder weights,
    training inputs) and kept in ``<cache_dir>/metakd/<key>.pt``; a cache file that does not
    load is recomputed."""
    from modeling import safe_torch_load
    from training import weights_digest
    domains = list(train)
    digests = {d: inputs_digest(train[d]) for d in domains}
    model = unwrap(encoder)  # the key: what e_i reads (not the pooler or heads, seeded per run)
    key = hashlib.sha1("|".join([weights_digest(model.embeddings), weights_digest(model.encoder),
                                 *domains, *digests.values()]).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, "metakd", f"{key}.pt")
    if os.path.isfile(path):
        try:
            content = safe_torch_load(path)
            if content.get("inputs") == digests:
                logger.info("Meta-KD instance weights from %s", path)
                return content
        except Exception as err:  # a damaged file is recomputed, never trusted
            logger.warning("%s: unreadable (%s); recomputing the instance weights", path, err)
    logger.info("Meta-KD instance weights: embedding %d training examples with the untuned "
                "encoder", sum(f["labels"].shape[0] for f in train.values()))
    scores = prototype_scores([embed(encoder, train[d], batch_size, device) for d in domains])
    content = {"domains": domains, "weights": dict(zip(domains, scores)), "inputs": digests}
    if is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_torch_save(content, path)
    for domain, t in zip(domains, scores):
        logger.info("t_i of %s: mean %.4f, min %.4f, max %.4f", domain, float(t.mean()),
                    float(t.min()), float(t.max()))
    return content


def read_instance_weights(teacher_dir: str, domain: str,
                          train: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Stage B: the t_i of ``domain``'s training examples, from the meta-teacher's run; the
    training inputs must be those the meta-teacher's weights were computed on."""
    from modeling import safe_torch_load
    folder = teacher_dir if os.path.isdir(teacher_dir) else os.path.dirname(teacher_dir)
    path = os.path.join(folder, INSTANCE_WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; --teacher_dir must be a meta-teacher run "
                                f"(train_meta_teacher.py), which writes it")
    content = safe_torch_load(path)
    if domain not in content["weights"]:
        raise ValueError(f"{path}: no instance weights for domain '{domain}' (it has "
                         f"{', '.join(content['weights'])})")
    if content["inputs"][domain] != inputs_digest(train):
        raise ValueError(f"{path}: the meta-teacher's instance weights were computed on other "
                         f"training examples of '{domain}' than this run's (--train_ratio, "
                         f"--data_seed, --max_seq_length and the vocabulary must match stage A's)")
    return content["weights"][domain]


# --------------------------------------------------------------------------------------------
# A1-A2: the meta-teacher's domain branch and loss
# --------------------------------------------------------------------------------------------
class DomainBranch(nn.Module):
    """E (one row per domain of the task), W_u (width x width) and W_g (width -> domains).

    ``feature``: W_u (E[d_i] + c_i) + b_u, c_i = ``tail_mean`` of the last hidden states (the
    domain feature of B1, without tanh as the code has it there); ``forward``: the domain logits
    W_g Dropout(tanh(feature)) + b_g of A1."""

    def __init__(self, width: int, num_domains: int, dropout: float = 0.1,
                 initializer_range: float = 0.02):
        super().__init__()
        self.embedding = nn.Embedding(num_domains, width)
        self.dense = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_domains)
        for module in (self.embedding, self.dense, self.classifier):
            module.weight.data.normal_(0.0, initializer_range)
        for module in (self.dense, self.classifier):
            module.bias.data.zero_()

    @classmethod
    def of(cls, config, num_domains: int) -> "DomainBranch":
        """The branch of a model of ``config`` (its width, dropout and initialiser range)."""
        return cls(config.hidden_size, num_domains, config.hidden_dropout_prob,
                   config.initializer_range)

    def feature(self, last_hidden: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        return self.dense(self.embedding(domain_ids) + tail_mean(last_hidden))

    def forward(self, last_hidden: torch.Tensor, domain_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.feature(last_hidden, domain_ids))))


def meta_teacher_loss(logits, domain_logits, labels, corrupted_domains, weights,
                      domain_loss_weight: float) -> Dict[str, torch.Tensor]:
    """A2: (1/B) sum_i t_i (CE(z_i, y_i) + alpha CE(g_i, d_pi(i))); ``weights`` None: t_i = 1."""
    sentiment = F.cross_entropy(full_precision(logits), labels, reduction="none")
    domain = F.cross_entropy(full_precision(domain_logits), corrupted_domains, reduction="none")
    per_example = sentiment + domain_loss_weight * domain
    if weights is not None:
        per_example = weights * per_example
    return {"loss": per_example.mean(), "ce": sentiment.mean().detach(),
            "domain_ce": domain.mean().detach()}


def batch_weights(weights: Sequence[torch.Tensor], batches, device) -> torch.Tensor:
    """t_i of a step's rows, domain after domain (``batches[d]['example_index']``)."""
    return torch.cat([weights[d][batch["example_index"].cpu()] for d, batch in
                      enumerate(batches)]).to(device)


def make_meta_teacher_loss(branch: DomainBranch, weights: Optional[Sequence[torch.Tensor]],
                           config: MetaKDConfig):
    """Stage A: one forward of the pooled-head teacher over every domain's batch; the domain
    head learns the domain of a uniformly permuted batch-mate (torch's generator, whose state
    the resume state carries)."""

    def compute_loss(model, batches):
        batch, domain_ids, _ = concat_domain_batches(batches)
        out = model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                    score_layers=())
        corrupted = domain_ids[torch.randperm(domain_ids.shape[0]).to(domain_ids.device)]
        t = batch_weights(weights, batches, domain_ids.device) if config.sample_weights \
            else None
        return meta_teacher_loss(out.logits, branch(out.hidden_states[-1], domain_ids),
                                 batch["labels"], corrupted, t, config.domain_loss_weight)

    return compute_loss


# --------------------------------------------------------------------------------------------
# Stage B: the meta-teacher and the two phases' folders
# --------------------------------------------------------------------------------------------
def intermediate_args(args) -> argparse.Namespace:
    """B1's flags: its folder, its length, and whether it continues (--resume, or
    --skip_finished finding it interrupted; a --resume with nothing to continue fails there as
    in every stage)."""
    phase = argparse.Namespace(**vars(args))
    phase.output_dir = os.path.join(args.output_dir, INTERMEDIATE_DIR)
    phase.num_train_epochs = args.intermediate_epochs
    phase.max_steps = args.intermediate_max_steps
    has_state = os.path.isfile(os.path.join(phase.output_dir, RunDir.LAST))
    phase.resume = (has_state and (args.resume or args.skip_finished)) or (
        args.resume and not has_state)
    return phase


def intermediate_finished(args) -> bool:
    path = os.path.join(args.output_dir, INTERMEDIATE_DIR)
    return not args.overwrite and run_status(path)["state"] == "finished"


def load_meta_teacher(teacher_dir: str, device, amp: str):
    """The frozen meta-teacher, its frozen domain branch, the task's domains and the file."""
    path = find_weights_file(teacher_dir)
    content = read_checkpoint(path)
    if "domain_branch_state_dict" not in content:
        raise ValueError(f"{path}: not a meta-teacher (no domain branch); --teacher_dir must be "
                         f"a train_meta_teacher.py run")
    teacher = freeze(model_from_checkpoint(path), amp).to(device)
    state = content["domain_branch_state_dict"]
    branch = DomainBranch.of(teacher.config, state["embedding.weight"].shape[0])
    branch.load_state_dict(state)
    return teacher, freeze(branch).to(device), list(content["domains"]), path


# --------------------------------------------------------------------------------------------
# B1: intermediate layers
# --------------------------------------------------------------------------------------------
def expertise_weights(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lambda_i = 1 / (1 + exp((1 - p_y)^2)) = sigmoid(-(1 - p_y)^2), p the teacher's softmax
    and y the gold label: in [1 / (1 + e), 1/2], higher for a confident, correct teacher."""
    p_gold = torch.softmax(full_precision(teacher_logits), dim=-1).gather(
        -1, labels[:, None])[:, 0]
    return torch.sigmoid(-(1.0 - p_gold) ** 2)


def per_instance_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example (row) over all its other elements (padding too)."""
    squared = (full_precision(student) - full_precision(teacher)) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def attention_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention (the code distils probabilities, not scores); the scores carry
    the -10000 mask of padded keys, so padded keys get probability 0."""
    return torch.softmax(full_precision(scores), dim=-1)


def intermediate_terms(student_hidden, student_scores, teacher_hidden, teacher_scores,
                       student_feature, teacher_feature) -> Dict[str, torch.Tensor]:
    """Per-instance hidden (sum over student levels k = 0..L_s of the fitted H^s_k against the
    teacher's mapped level), attention (sum over student blocks of the probability MSE) and
    domain-feature MSE, each (B,)."""
    student_layers = len(student_scores)
    mapped = teacher_layer_for(student_layers, len(teacher_scores))
    hidden = per_instance_mse(student_hidden[0], teacher_hidden[0])
    attention = torch.zeros_like(hidden)
    for i, j in enumerate(mapped, start=1):
        hidden = hidden + per_instance_mse(student_hidden[i], teacher_hidden[j])
        attention = attention + per_instance_mse(attention_probabilities(student_scores[i - 1]),
                                                 attention_probabilities(teacher_scores[j - 1]))
    return {"hidden": hidden, "attention": attention,
            "domain": per_instance_mse(student_feature, teacher_feature)}


def intermediate_loss(terms: Dict[str, torch.Tensor], weights: torch.Tensor,
                      domain_loss_weight: float, on_batch_mean: bool = False
                      ) -> Dict[str, torch.Tensor]:
    """B1 from ``intermediate_terms`` and w_i = (1 + t_i) lambda_i: mean_i w_i (hid_i + att_i +
    gamma dom_i) (each example's loss weighted: fix B1); ``on_batch_mean``: the code's
    (mean hid + mean att + gamma mean dom) * mean w, where w only rescales the batch."""
    per_example = terms["hidden"] + terms["attention"] + domain_loss_weight * terms["domain"]
    loss = (per_example.mean() * weights.mean() if on_batch_mean
            else (weights * per_example).mean())
    return {"loss": loss, **{f"{name}_loss": value.mean().detach()
                             for name, value in terms.items()},
            "weight": weights.mean().detach()}


def teacher_feature(teacher_branch: DomainBranch, teacher_out, domain_ids) -> torch.Tensor:
    """r^t: the frozen teacher's own domain feature (no random projection: fix B2)."""
    with torch.no_grad():
        return teacher_branch.feature(teacher_out.hidden_states[-1], domain_ids).float()


def student_forward(student, inputs, score_layers=None):
    """The student's logits, fitted hidden states and scores, and its raw last hidden state
    (the domain feature pools it before the fit map)."""
    out = student(*inputs, score_layers=score_layers, fit=False)
    model = unwrap(student)
    fitted = [fit(h) for fit, h in zip(model.fit_denses, out.hidden_states)]
    return out, fitted


def make_intermediate_loss(teacher, teacher_branch: DomainBranch, student_branch: DomainBranch,
                           weights: torch.Tensor, domain_id: int, config: MetaKDConfig,
                           targets=None):
    """Stage B1 for one target domain: the teacher's outputs from ``targets`` (the teacher
    cache) when filled, else a frozen forward; ``weights`` are the domain's t_i by example."""

    def compute_loss(student, batches):
        batch = batches[0]
        teacher_out = one_teacher_output(teacher, student, batches, targets)
        domain_ids = torch.full_like(batch["labels"], domain_id)
        out, fitted = student_forward(student, batch_inputs(batch))
        # the student's feature goes through its last level's fit map to the teacher's width
        student_feature = unwrap(student).fit_denses[-1](
            student_branch.feature(out.hidden_states[-1], domain_ids))
        terms = intermediate_terms(fitted, out.attention_scores, teacher_out.hidden_states,
                                   teacher_out.attention_scores, student_feature,
                                   teacher_feature(teacher_branch, teacher_out, domain_ids))
        t = weights[batch["example_index"].cpu()].to(batch["labels"].device)
        w = (1.0 + t) * expertise_weights(teacher_out.logits, batch["labels"])
        return intermediate_loss(terms, w, config.domain_loss_weight, config.on_batch_mean)

    return compute_loss


# --------------------------------------------------------------------------------------------
# B2: prediction layer
# --------------------------------------------------------------------------------------------
def prediction_loss(student_logits, teacher_logits, temperature: float = 2.0):
    """mean_i sum_c -softmax(z^t_i / T)_c log softmax(z^s_i / T)_c: no T^2, no gold labels."""
    targets = torch.softmax(full_precision(teacher_logits) / temperature, dim=-1)
    log_probs = torch.log_softmax(full_precision(student_logits) / temperature, dim=-1)
    return (-targets * log_probs).sum(dim=-1).mean()


def make_prediction_loss(teacher, config: MetaKDConfig, targets=None):
    """Stage B2: only the logits of teacher and student (the student runs no fit maps and
    builds no attention scores)."""

    def compute_loss(student, batches):
        teacher_logits = one_teacher_output(teacher, student, batches, targets).logits
        logits = student(*batch_inputs(batches[0]), score_layers=(), fit=False).logits
        return {"loss": prediction_loss(logits, teacher_logits, config.temperature)}

    return compute_loss

