"""Readers on hand-written files in the real formats, the spec's splits, the cache, the sampler."""
import math
import os

import numpy as np
import pytest
import torch

import data_processing as dp
import sample_corpus
from tokenization import WordPieceTokenizer

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")


def mnli_row(index, genre, premise, hypothesis, label):
    return (f"{index}\t{index}\t{index}e\t{genre}\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t"
            f"{premise}\t{hypothesis}\t{label}\t{label}\n")


def write_mnli(folder, train_rows, test_rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.tsv"), "w", encoding="utf-8") as handle:
        handle.write("\ufeff" + MNLI_HEADER + "".join(train_rows))
    with open(os.path.join(folder, "dev_matched.tsv"), "w", encoding="utf-8") as handle:
        handle.write(MNLI_HEADER + "".join(test_rows))


def test_mnli_reader_columns_quotes_and_split(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    rows = [mnli_row(i, "fiction", f'He said "hi {i}', f"it's {i}\"", labels[i % 3])
            for i in range(25)]
    rows.insert(3, mnli_row(99, "travel", "a", "b", "neutral"))
    write_mnli(tmp_path, rows, [mnli_row(0, "fiction", "p", "h", "entailment")])
    splits = dp.MnliProcessor().read_splits(str(tmp_path), "fiction")
    assert len(splits["train"]) == math.floor(0.9 * 25) == 22
    assert len(splits["dev"]) == 25 - math.floor(0.9 * 25) == 3
    assert splits["train"][0].text_a == 'He said "hi 0' and splits["train"][0].text_b == "it's 0\""
    assert splits["train"][0].label == dp.MnliProcessor.labels.index("entailment")
    assert [e.text_a for e in splits["dev"]] == [f'He said "hi {i}' for i in (22, 23, 24)]
    assert len(splits["test"]) == 1
    few = dp.MnliProcessor().read_splits(str(tmp_path), "fiction", train_ratio=0.9 * 0.2)
    assert len(few["train"]) == math.floor(0.18 * 25) and len(few["dev"]) == 3


def test_mnli_bad_rows_name_file_and_line(tmp_path):
    write_mnli(tmp_path / "short", [mnli_row(0, "fiction", "a", "b", "neutral"),
                                    "1\t2\tfiction\tonly\n"], [])
    with pytest.raises(dp.DataError, match=r"train.tsv:3: expected at least 12"):
        dp.MnliProcessor().read_splits(str(tmp_path / "short"), "fiction")
    write_mnli(tmp_path / "label", [mnli_row(0, "fiction", "a", "b", "maybe")], [])
    with pytest.raises(dp.DataError, match=r"train.tsv:2: unknown label 'maybe'"):
        dp.MnliProcessor().read_splits(str(tmp_path / "label"), "fiction")
    write_mnli(tmp_path / "empty", [mnli_row(0, "travel", "a", "b", "neutral")],
               [mnli_row(0, "travel", "a", "b", "neutral")])
    with pytest.raises(dp.DataError, match="no examples of genre 'fiction'"):
        dp.MnliProcessor().read_splits(str(tmp_path / "empty"), "fiction")
    with pytest.raises(ValueError, match="unknown mnli domain 'poetry'"):
        dp.MnliProcessor().read_splits(str(tmp_path / "empty"), "poetry")


def review_block(text_lines, number=0):
    return ("<review>\n<unique_id>\nid\n</unique_id>\n<rating>\n5.0\n</rating>\n<review_text>\n"
            + "\n".join(text_lines) + "\n</review_text>\n</review>\n")


def test_amazon_review_file_blocks_multiline_and_bad_bytes(tmp_path):
    path = tmp_path / "positive.review"
    content = (review_block(["first line", "", "  second line  "]) +
               review_block(["only one"]) + review_block(["caf\xe9 bytes"]))
    path.write_bytes(content.encode("utf-8").replace("caf\xc3\xa9".encode("latin-1"), b"caf\xe9"))
    texts = dp.AmazonProcessor.read_review_file(str(path))
    assert texts[:2] == ["first line second line", "only one"]
    assert texts[2] == "caf\ufffd bytes"  # decoded, not fatal
    empty = tmp_path / "negative.review"
    empty.write_text("<review>\n<rating>\n1.0\n</rating>\n</review>\n")
    with pytest.raises(dp.DataError, match="negative.review: no <review_text> blocks"):
        dp.AmazonProcessor.read_review_file(str(empty))


def write_amazon_domain(folder, per_label):
    os.makedirs(folder, exist_ok=True)
    for label in ("positive", "negative"):
        with open(os.path.join(folder, f"{label}.review"), "w") as handle:
            handle.write("".join(review_block([f"{label} review {i}"]) for i in range(per_label)))


def test_amazon_spec_split_sizes_and_kitchen_alias(tmp_path):
    for domain, folder in [("books", "books"), ("dvd", "dvd"), ("electronics", "electronics"),
                           ("kitchen", "kitchen_&_housewares")]:
        write_amazon_domain(tmp_path / folder, 1000)
        splits = dp.AmazonProcessor().read_splits(str(tmp_path), domain)
        assert tuple(len(splits[s]) for s in ("train", "dev", "test")) == \
            dp.AmazonProcessor.SPLIT_COUNTS[domain]
        texts = [e.text_a for s in splits.values() for e in s]
        assert len(set(texts)) == 2000
        for split in splits.values():
            for example in split:
                assert example.label == (1 if example.text_a.startswith("positive") else 0)
    again = dp.AmazonProcessor().read_splits(str(tmp_path), "books")
    first = dp.AmazonProcessor().read_splits(str(tmp_path), "books")
    assert [e.text_a for e in again["test"]] == [e.text_a for e in first["test"]]
    other_seed = dp.AmazonProcessor().read_splits(str(tmp_path), "books", data_seed=7)
    assert [e.text_a for e in other_seed["test"]] != [e.text_a for e in first["test"]]
    few = dp.AmazonProcessor().read_splits(str(tmp_path), "books", train_ratio=0.09)
    assert len(few["train"]) == math.floor(1631 * 0.1) and len(few["test"]) == 199
    with pytest.raises(dp.DataError, match="music: data directory not found"):
        dp.AmazonProcessor().domain_dir(str(tmp_path), "music")


def test_feature_cache_written_once_and_keyed(sample, tmp_path):
    tokenizer = WordPieceTokenizer(sample["vocab"])
    cache = tmp_path / "cache"
    first = dp.load_domain_features("amazon", sample["amazon"], "dvd", tokenizer, 32,
                                    cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1
    second = dp.load_domain_features("amazon", sample["amazon"], "dvd", tokenizer, 32,
                                     cache_dir=str(cache))
    for split in first:
        for name in first[split]:
            assert torch.equal(first[split][name], second[split][name])
    dp.load_domain_features("amazon", sample["amazon"], "dvd", tokenizer, 48,
                            cache_dir=str(cache))
    dp.load_domain_features("amazon", sample["amazon"], "dvd", tokenizer, 32,
                            train_ratio=0.45, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 3
    assert first["train"]["input_ids"].shape[1] == 32


def test_sampler_per_step_composition():
    sizes = [50, 23, 7]
    sampler = dp.MultiDomainBatchSampler(sizes, batch_size=4, fit_domain=0, seed=3)
    assert len(sampler) == math.ceil(50 / 4)
    steps = list(sampler.epoch(0))
    assert len(steps) == 13
    for step in steps:
        assert [len(indices) for indices in step] == [4, 4, 4]
        for indices, size in zip(step, sizes):
            assert indices.min() >= 0 and indices.max() < size
    fit_seen = np.concatenate([step[0] for step in steps])
    assert set(fit_seen.tolist()) == set(range(50))  # the fit domain is covered every epoch
    small_seen = np.concatenate([step[2] for step in steps])
    assert set(small_seen.tolist()) == set(range(7))  # the others cycle through their data
    again = list(dp.MultiDomainBatchSampler(sizes, 4, 0, seed=3).epoch(0))
    assert all(np.array_equal(a, b) for s, t in zip(steps, again) for a, b in zip(s, t))
    next_epoch = list(sampler.epoch(1))
    assert not np.array_equal(steps[0][0], next_epoch[0][0])
    resumed = list(sampler.epoch(0, start_step=5))
    assert all(np.array_equal(a, b) for s, t in zip(steps[5:], resumed) for a, b in zip(s, t))


def test_sampler_ranks_get_distinct_examples():
    sizes = [40, 40]
    ranks = [list(dp.MultiDomainBatchSampler(sizes, 5, 0, seed=0, rank=r, world_size=2).epoch(0))
             for r in range(2)]
    assert len(ranks[0]) == math.ceil(40 / 10)
    for step_a, step_b in zip(*ranks):
        for a, b in zip(step_a, step_b):
            assert not set(a.tolist()) & set(b.tolist())


def test_generated_sample_reads_with_real_readers(sample):
    for genre in dp.MnliProcessor.domains:
        splits = dp.MnliProcessor().read_splits(sample["mnli"], genre)
        assert splits["train"] and splits["dev"] and splits["test"]
    sizes = {g: len(dp.MnliProcessor().read_splits(sample["mnli"], g)["train"])
             for g in dp.MnliProcessor.domains}
    assert max(sizes, key=sizes.get) == "telephone"
    for domain in dp.AmazonProcessor.domains:
        splits = dp.AmazonProcessor().read_splits(sample["amazon"], domain)
        assert {e.label for e in splits["train"]} == {0, 1}
    tokenizer = WordPieceTokenizer(sample["vocab"])
    assert "[UNK]" not in tokenizer.tokenize("the blender was sturdy, i love it!")


def test_generator_is_deterministic(tmp_path):
    a = sample_corpus.generate_sample(str(tmp_path / "a"), "tiny", seed=5)
    b = sample_corpus.generate_sample(str(tmp_path / "b"), "tiny", seed=5)
    for key in ("mnli", "amazon"):
        for root, _, files in os.walk(a[key]):
            for name in files:
                other = os.path.join(b[key], os.path.relpath(os.path.join(root, name), a[key]))
                assert open(os.path.join(root, name), "rb").read() == open(other, "rb").read()


def test_noisy_domain_flips_only_its_labels(tmp_path):
    clean = sample_corpus.generate_sample(str(tmp_path / "clean"), "tiny", seed=3)
    noisy = sample_corpus.generate_sample(str(tmp_path / "noisy"), "tiny", seed=3, noisy_domain="kitchen",
                               flip_prob=0.5)
    for domain in ("books", "dvd"):
        for name in ("positive.review", "negative.review"):
            assert (open(os.path.join(clean["amazon"], domain, name)).read()
                    == open(os.path.join(noisy["amazon"], domain, name)).read())
    texts = {}
    for root in (clean, noisy):
        for label in ("positive", "negative"):
            path = os.path.join(root["amazon"], "kitchen", f"{label}.review")
            for text in dp.AmazonProcessor.read_review_file(path):
                texts.setdefault(text, []).append(label)
    flipped = sum(1 for labels in texts.values() if len(set(labels)) == 2)
    assert 0.3 * len(texts) < flipped < 0.7 * len(texts)
    with pytest.raises(ValueError, match="unknown noisy domain"):
        sample_corpus.generate_sample(str(tmp_path / "x"), "tiny", noisy_domain="music", flip_prob=0.1)


def test_label_noise_flips_only_the_asked_training_labels(sample, tmp_path):
    """The study's unreliable domain: train labels flipped with p (seeded), dev/test clean,
    its own cache entry."""
    tokenizer = WordPieceTokenizer(sample["vocab"])
    examples = [dp.Example(f"t{i}", None, i % 2) for i in range(1000)]
    flipped = dp.flip_labels(examples, 2, 0.4, seed=3)
    changed = sum(a.label != b.label for a, b in zip(examples, flipped))
    assert 340 < changed < 460 and flipped == dp.flip_labels(examples, 2, 0.4, seed=3)
    assert all(a.label != b.label for a, b in zip(examples, dp.flip_labels(examples, 2, 1.0, 0)))
    cache = str(tmp_path / "cache")
    clean = dp.load_task_features("amazon", sample["amazon"], ["books", "dvd"], tokenizer, 32,
                                  cache_dir=cache)
    noisy = dp.load_task_features("amazon", sample["amazon"], ["books", "dvd"], tokenizer, 32,
                                  cache_dir=cache, noisy_domain="dvd", flip_prob=1.0)
    assert len(os.listdir(cache)) == 3  # books shared, dvd clean and dvd noisy
    assert torch.equal(noisy["books"]["train"]["labels"], clean["books"]["train"]["labels"])
    assert torch.equal(noisy["dvd"]["train"]["labels"], 1 - clean["dvd"]["train"]["labels"])
    for split in ("dev", "test"):
        assert torch.equal(noisy["dvd"][split]["labels"], clean["dvd"][split]["labels"])
