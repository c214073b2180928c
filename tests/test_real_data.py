"""The real Amazon reviews (../shared/data/amazon) and the real MiniLM teacher, kept fast.

Skipped only where ../shared is absent (a user's clone without the development data); in this
project's checkout and in CI the data is there and these tests run.
"""
import os

import pytest
import torch
import transformers

from conftest import ROOT
from data_processing import AmazonProcessor, examples_to_tensors, take
from tokenization import WordPieceTokenizer
from distillation import DomainRelationalGraph
from modeling import BertClassifier, config_source, load_weights, resolve_config
import objectives
import weighting

AMAZON = os.path.join(os.path.dirname(ROOT), "shared", "data", "amazon")
pytestmark = pytest.mark.skipif(not os.path.isdir(AMAZON),
                                reason=f"{AMAZON} absent: the real reviews are not in this clone")


@pytest.fixture(scope="module")
def real_splits():
    processor = AmazonProcessor()
    return {d: processor.read_splits(AMAZON, d) for d in processor.domains}


def test_reader_gives_the_spec_counts(real_splits):
    for domain, splits in real_splits.items():
        counts = tuple(len(splits[name]) for name in ("train", "dev", "test"))
        assert counts == AmazonProcessor.SPLIT_COUNTS[domain], domain
        labels = [e.label for name in splits for e in splits[name]]
        assert labels.count(0) == labels.count(1) == 1000, domain
        assert all(e.text_a.strip() and e.text_b is None for e in splits["train"])


def test_tokenizer_matches_transformers_on_real_reviews(real_splits, minilm_dir):
    vocab = os.path.join(minilm_dir, "vocab.txt")
    ours = WordPieceTokenizer(vocab, lowercase=True)
    reference = transformers.BertTokenizer(vocab, do_lower_case=True)
    # 50 reviews of each domain, those holding U+FFFD (this copy's replaced bytes) first.
    texts = [text for splits in real_splits.values()
             for text in sorted((e.text_a for e in splits["train"]),
                                key=lambda t: "\ufffd" not in t)[:50]]
    assert len(texts) == 200 and any("\ufffd" in t for t in texts)
    for text, ids in zip(texts, ours.tokenize_ids(texts)):
        assert ids == reference.encode(text, add_special_tokens=False)
    features = ours.encode_pairs(texts, None, 128)
    expected = reference(texts, max_length=128, truncation=True, padding="max_length")
    assert features["input_ids"].tolist() == expected["input_ids"]
    assert features["segment_ids"].tolist() == expected["token_type_ids"]
    assert features["attention_mask"].tolist() == expected["attention_mask"]


def test_hrkd_steps_with_the_minilm_teacher_lower_the_loss(real_splits, minilm_dir):
    """A MiniLM multi-domain teacher, the real configuration's student (MiniLM blocks 1-2),
    the released graph: a few steps on real reviews at T = 32 lower the HRKD loss."""
    torch.manual_seed(0)
    tokenizer = WordPieceTokenizer(os.path.join(minilm_dir, "vocab.txt"))
    batches = [take(examples_to_tensors(real_splits[d]["train"][:4], tokenizer, 32),
                    torch.arange(4)) for d in AmazonProcessor.domains]
    config = resolve_config(config_source(None, minilm_dir, "bert_base"), len(tokenizer))
    teacher = BertClassifier(config, 2, num_domains=4)
    load_weights(teacher, minilm_dir)
    teacher = objectives.freeze(teacher)
    student_config = resolve_config(minilm_dir, len(tokenizer))
    student_config.num_hidden_layers = 2
    student = BertClassifier(student_config, 2, num_domains=4, fit_size=config.hidden_size)
    load_weights(student, minilm_dir, blocks=[1, 2])
    graph = DomainRelationalGraph(3, 4, config.hidden_size).requires_grad_(False)
    compute_loss = objectives.make_hrkd_loss([teacher], [[0, 1, 2, 3]],
                                             weighting.GraphWeighting(graph, False),
                                             objectives.DistillConfig())
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    losses = []
    for _ in range(6):
        loss = compute_loss(student, batches)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
