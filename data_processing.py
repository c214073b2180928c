"""Data: the Processor of each data set (MNLI by genre, the Amazon reviews, a folder of your own
domains) and its splits, the feature cache, the multi-domain batch sampler.

Reads
  MNLI:   <data_dir>/train.tsv, <data_dir>/dev_matched.tsv (GLUE format)
  Amazon: <data_dir>/<domain>/{positive,negative}.review (Blitzer et al., unprocessed files)
Writes
  <cache_dir>/<key>.pt: tokenized tensors, keyed by everything that changes them.

The tokenizer is in tokenization.py; the demo's generated corpus (in these same formats, so the
real readers are what the demo and the tests exercise) in sample_corpus.py.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made, not to read task facts
    import torch

import utils
from tokenization import WordPieceTokenizer

# --------------------------------------------------------------------------------------------
# Readers and splits
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Example:
    text_a: str
    text_b: Optional[str]
    label: int


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


def _check_ratios(train_ratio: float, dev_ratio: float):
    for name, value in (("train_ratio", train_ratio), ("dev_ratio", dev_ratio)):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--{name} must be in (0, 1], got {value}")


def first_invalid_utf8(path: str) -> str:
    """'<path>:<line>: ...' for the first byte of ``path`` that is not UTF-8 (a decode error
    carries only an offset inside the reader's buffer, not the line)."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return (f"{path}:{line}: byte 0x{data[err.start]:02x} is not UTF-8 "
                f"(convert the file to UTF-8)")
    return f"{path}: not UTF-8"


class Processor:
    """A data set of several domains: the interface every reader implements.

    Class attributes (the one place each task fact is written; the launchers, report.py and
    the ``--task`` choices ask for them): ``name``, ``domains`` (in the table's order),
    ``labels`` (fixed order = label ids), ``fit_domain`` (sets the epoch of the multi-domain
    stages: the largest domain)."""

    name: str = ""
    domains: List[str] = []
    labels: List[str] = []
    fit_domain: str = ""

    def files(self, data_dir: str, domain: str) -> List[str]:
        """The files ``domain`` is read from (for the feature cache's key)."""
        raise NotImplementedError

    def read_splits(self, data_dir: str, domain: str, train_ratio: float = 0.9,
                    dev_ratio: float = 0.1, data_seed: int = 42) -> Dict[str, List[Example]]:
        """{'train', 'dev', 'test'}: the domain's examples of each split, in a fixed order."""
        raise NotImplementedError

    def warnings(self) -> List[str]:
        """Things worth a log line at the start of a stage that do not stop it."""
        return []


class MnliProcessor(Processor):
    """MNLI by genre (REFERENCE.md section 2): per genre, the first train_ratio of its training
    rows to train, the last dev_ratio to dev, its rows of the evaluation file as the test set.

    Columns are read by their header names, in either of two layouts found in ``data_dir``:
    GLUE's ``train.tsv`` / ``dev_matched.tsv`` (``genre``, ``sentence1``, ``sentence2``,
    ``gold_label`` among the parse and id columns) or the MNLI sample's ``mnli_train.tsv`` /
    ``mnli_val.tsv`` (``sentence1 sentence2 label genre``; val rows are dev_matched rows)."""

    name = "mnli"
    domains = ["fiction", "government", "slate", "telephone", "travel"]
    labels = ["contradiction", "entailment", "neutral"]
    fit_domain = "telephone"
    # (training file, evaluation file) of each layout, looked for in this order
    LAYOUTS = (("train.tsv", "dev_matched.tsv"), ("mnli_train.tsv", "mnli_val.tsv"))
    GENRE, SENTENCE1, SENTENCE2 = "genre", "sentence1", "sentence2"
    LABEL_COLUMNS = ("gold_label", "label")  # GLUE's gold label, else the sample's label

    def files(self, data_dir: str, domain: str) -> List[str]:
        """The two files every genre is read from: the first layout of LAYOUTS present."""
        for layout in self.LAYOUTS:
            paths = [os.path.join(data_dir, name) for name in layout]
            if all(os.path.isfile(p) for p in paths):
                return paths
        for layout in self.LAYOUTS:  # one file of a layout alone: name the missing one
            paths = [os.path.join(data_dir, name) for name in layout]
            present = [p for p in paths if os.path.isfile(p)]
            if present:
                missing = next(p for p in paths if p not in present)
                raise DataError(f"{missing}: data file not found (beside {present[0]})")
        expected = " or ".join(" + ".join(layout) for layout in self.LAYOUTS)
        raise DataError(f"{os.path.join(data_dir, self.LAYOUTS[0][0])}: data file not found "
                        f"(expected {expected} in {data_dir})")

    def _read_tsv(self, path: str) -> Dict[str, List[Example]]:
        """Rows of one file grouped by genre, in file order."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found")
        by_genre: Dict[str, List[Example]] = {}
        label_ids = {label: i for i, label in enumerate(self.labels)}
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                self._read_rows(path, handle, by_genre, label_ids)
        except UnicodeDecodeError:
            raise DataError(first_invalid_utf8(path)) from None
        return by_genre

    def _columns(self, path: str, header: List[str]) -> Tuple[int, int, int, int]:
        """Positions of genre, sentence1, sentence2 and the label; a missing one is named."""
        index = {name.strip(): i for i, name in enumerate(header)}
        label = next((c for c in self.LABEL_COLUMNS if c in index), None)
        missing = [c for c in (self.GENRE, self.SENTENCE1, self.SENTENCE2) if c not in index]
        if label is None:
            missing.append(" or ".join(self.LABEL_COLUMNS))
        if missing:
            raise DataError(f"{path}:1: no {', '.join(missing)} column (an MNLI file has "
                            f"genre, sentence1, sentence2 and gold_label or label; found: "
                            f"{', '.join(index)})")
        return index[self.GENRE], index[self.SENTENCE1], index[self.SENTENCE2], index[label]

    def _read_rows(self, path: str, handle, by_genre: Dict[str, List[Example]],
                   label_ids: Dict[str, int]):
        # No quote character: GLUE rows hold unbalanced quotes (REFERENCE.md section 6).
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file")
        genre, first, second, gold = self._columns(path, header)
        needed = max(genre, first, second, gold) + 1
        for line_number, row in enumerate(reader, start=2):
            if len(row) < needed:
                raise DataError(f"{path}:{line_number}: expected at least {needed} "
                                f"tab-separated columns, found {len(row)}")
            label = row[gold].strip()
            if label not in label_ids:
                raise DataError(f"{path}:{line_number}: unknown label '{label}' "
                                f"(expected one of {', '.join(self.labels)})")
            by_genre.setdefault(row[genre], []).append(
                Example(row[first], row[second], label_ids[label]))

    def read_splits(self, data_dir: str, domain: str, train_ratio: float = 0.9,
                    dev_ratio: float = 0.1, data_seed: int = 42) -> Dict[str, List[Example]]:
        _check_domain(self, domain)
        _check_ratios(train_ratio, dev_ratio)
        train_file, test_file = self.files(data_dir, domain)
        rows = _cached_read(self._read_tsv, train_file).get(domain, [])
        if not rows:
            raise DataError(f"{train_file}: no examples of genre '{domain}'")
        test = _cached_read(self._read_tsv, test_file).get(domain, [])
        if not test:
            raise DataError(f"{test_file}: no examples of genre '{domain}'")
        count = len(rows)
        train = rows[:math.floor(train_ratio * count)]
        dev = rows[math.floor((1.0 - dev_ratio) * count):]
        if not train:
            raise DataError(f"{train_file}: genre '{domain}' has no training examples at "
                            f"train_ratio {train_ratio}")
        return {"train": train, "dev": dev, "test": test}


class AmazonProcessor(Processor):
    """Amazon multi-domain reviews: 2,000 per domain, shuffled once, fixed split counts."""

    name = "amazon"
    domains = ["books", "dvd", "electronics", "kitchen"]
    labels = ["negative", "positive"]  # a fixed list, not the released code's Python set
    fit_domain = "books"
    SPLIT_COUNTS = {"books": (1631, 170, 199), "dvd": (1621, 194, 185),
                    "electronics": (1615, 172, 213), "kitchen": (1613, 184, 203)}
    FOLDER_ALIASES = {"kitchen": ["kitchen", "kitchen_&_housewares"]}

    def domain_dir(self, data_dir: str, domain: str) -> str:
        for folder in self.FOLDER_ALIASES.get(domain, [domain]):
            candidate = os.path.join(data_dir, folder)
            if os.path.isdir(candidate):
                return candidate
        raise DataError(f"{os.path.join(data_dir, domain)}: data directory not found")

    def files(self, data_dir: str, domain: str) -> List[str]:
        folder = self.domain_dir(data_dir, domain)
        return [os.path.join(folder, f"{label}.review") for label in self.labels]

    @staticmethod
    def read_review_file(path: str) -> List[str]:
        """Texts of every <review_text> block, lines joined with single spaces.

        Bytes that are not UTF-8 (the original files hold some Latin-1) are decoded as U+FFFD,
        which the tokenizer drops, instead of stopping the run.
        """
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found")
        texts, current = [], None
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                stripped = line.strip()
                if stripped == "<review_text>":
                    current = []
                elif stripped == "</review_text>":
                    if current is not None:
                        texts.append(" ".join(current))
                    current = None
                elif current is not None and stripped:
                    current.append(stripped)
        if not texts:
            raise DataError(f"{path}: no <review_text> blocks found")
        return texts

    def split_counts(self, domain: str, total: int) -> Tuple[int, int, int]:
        """The spec's counts for the real 2,000-review domains; else about 81.5/8.5/10%."""
        counts = self.SPLIT_COUNTS.get(domain)
        if counts and sum(counts) == total:
            return counts
        test = round(0.1 * total)
        dev = round(0.085 * total)
        return total - dev - test, dev, test

    def read_splits(self, data_dir: str, domain: str, train_ratio: float = 0.9,
                    dev_ratio: float = 0.1, data_seed: int = 42) -> Dict[str, List[Example]]:
        _check_domain(self, domain)
        _check_ratios(train_ratio, dev_ratio)
        reviews = []
        for label_id, path in enumerate(self.files(data_dir, domain)):
            reviews += [Example(text, None, label_id) for text in self.read_review_file(path)]
        # Shuffled once with a fixed data seed, so splits do not depend on the run's --seed.
        random.Random(data_seed).shuffle(reviews)
        n_train, n_dev, _ = self.split_counts(domain, len(reviews))
        train = reviews[:n_train]
        # Few-shot: train_ratio is relative to the default 0.9 (0.9 x p keeps a fraction p).
        keep = max(1, math.floor(len(train) * min(train_ratio / 0.9, 1.0)))
        return {"train": train[:keep], "dev": reviews[n_train:n_train + n_dev],
                "test": reviews[n_train + n_dev:]}


class CustomProcessor(Processor):
    """Your own domains, no code: a folder with one sub-folder per domain.

        <data_dir>/labels.txt                 optional: the label order, one per line
        <data_dir>/<domain>/train.<ext>       required
        <data_dir>/<domain>/dev.<ext>         optional: else --dev_ratio of train (logged)
        <data_dir>/<domain>/test.<ext>        required

    <ext> is tsv, csv or jsonl (chosen by the extension). TSV/CSV files start with a header;
    TSV has no quote character (as GLUE), CSV the usual double quotes. Columns / JSON keys:
    ``text`` (or ``sentence``, ``sentence1``), optional ``text_pair`` (or ``sentence2``), ``label``. Without
    labels.txt the labels are the sorted set of every domain's training labels. Domains are the
    sub-folders (sorted); the fit domain is the largest by training examples.
    """

    name = "custom"
    EXTENSIONS = ("tsv", "csv", "jsonl")
    TEXT, PAIR, LABEL = ("text", "sentence", "sentence1"), ("text_pair", "sentence2"), "label"
    LABEL_FILE = "labels.txt"

    def __init__(self, data_dir: Optional[str] = None):
        self.data_dir = data_dir
        if data_dir is None:
            return
        if not os.path.isdir(data_dir):
            raise DataError(f"{data_dir}: data directory not found")
        folders = sorted(e for e in os.listdir(data_dir)
                         if os.path.isdir(os.path.join(data_dir, e)) and not e.startswith(".")
                         and e != "cache")
        seen: Dict[str, str] = {}
        for folder in folders:
            if folder.lower() in seen:
                raise DataError(f"{os.path.join(data_dir, folder)}: domain names differ only by "
                                f"case from '{seen[folder.lower()]}' (rename one)")
            seen[folder.lower()] = folder
        if not folders:
            raise DataError(f"{data_dir}: no domain sub-folders")
        self.domains = folders
        self.labels = self._labels()
        sizes = {d: len(self._rows(d, "train")) for d in self.domains}
        self.fit_domain = max(self.domains, key=lambda d: (sizes[d], -self.domains.index(d)))

    def split_file(self, domain: str, split: str) -> Optional[str]:
        folder = os.path.join(self.data_dir, domain)
        found = [os.path.join(folder, f"{split}.{ext}") for ext in self.EXTENSIONS
                 if os.path.isfile(os.path.join(folder, f"{split}.{ext}"))]
        if len(found) > 1:
            raise DataError(f"{folder}: several {split} files ({', '.join(found)}); keep one")
        return found[0] if found else None

    def files(self, data_dir: str, domain: str) -> List[str]:
        found = [self.split_file(domain, split) for split in ("train", "dev", "test")]
        labels = os.path.join(data_dir, self.LABEL_FILE)
        return [f for f in found if f] + ([labels] if os.path.isfile(labels) else [])

    def _rows(self, domain: str, split: str) -> List[Tuple[str, Optional[str], str, int]]:
        """(text, pair, label, line) of a split's file, or [] when it has none."""
        path = self.split_file(domain, split)
        if path is None:
            if split == "dev":
                return []
            raise DataError(f"{os.path.join(self.data_dir, domain)}: no {split} file "
                            f"({split}.tsv, {split}.csv or {split}.jsonl)")
        rows = _cached_read(read_table, path)
        if split == "train" and not rows:
            raise DataError(f"{path}: no examples")
        return rows

    def _labels(self) -> List[str]:
        label_file = os.path.join(self.data_dir, self.LABEL_FILE)
        if os.path.isfile(label_file):
            with open(label_file, encoding="utf-8") as handle:
                labels = [line.strip() for line in handle if line.strip()]
            if len(set(labels)) != len(labels) or len(labels) < 2:
                raise DataError(f"{label_file}: needs two or more distinct labels, one per line")
            return labels
        return sorted({row[2] for d in self.domains for row in self._rows(d, "train")})

    def warnings(self) -> List[str]:
        label_file = os.path.join(self.data_dir, self.LABEL_FILE)
        seen = {row[2] for d in self.domains for row in self._rows(d, "train")}
        unused = [label for label in self.labels if label not in seen]
        if not unused:
            return []
        return [f"{label_file}: label(s) {', '.join(unused)} have no training example in any "
                f"domain (the model can still predict them, but never learns them)"]

    def read_splits(self, data_dir: str, domain: str, train_ratio: float = 0.9,
                    dev_ratio: float = 0.1, data_seed: int = 42) -> Dict[str, List[Example]]:
        _check_domain(self, domain)
        _check_ratios(train_ratio, dev_ratio)
        label_ids = {label: i for i, label in enumerate(self.labels)}
        splits = {}
        for split in ("train", "dev", "test"):
            path = self.split_file(domain, split)
            examples = []
            for text, pair, label, line in self._rows(domain, split):
                if label not in label_ids:
                    seen = "in labels.txt" if os.path.isfile(
                        os.path.join(self.data_dir, self.LABEL_FILE)) else "in any training file"
                    raise DataError(f"{path}:{line}: label '{label}' is not {seen} "
                                    f"({', '.join(self.labels)})")
                examples.append(Example(text, pair, label_ids[label]))
            splits[split] = examples
        if not splits["dev"]:
            # No dev file: a seeded --dev_ratio share of the training rows.
            train = list(splits["train"])
            random.Random(data_seed).shuffle(train)
            count = max(1, round(dev_ratio * len(train)))
            splits["train"], splits["dev"] = train[:-count], train[-count:]
            logging.getLogger("hrkd").info(
                "%s: no dev file; dev = %d of its %d training examples (--dev_ratio %g)",
                os.path.join(self.data_dir, domain), count, len(train), dev_ratio)
        keep = max(1, math.floor(len(splits["train"]) * min(train_ratio / 0.9, 1.0)))
        splits["train"] = splits["train"][:keep]
        return splits


def _first_of(names: Sequence[str], fields: Sequence[str]) -> Optional[str]:
    return next((n for n in names if n in fields), None)


def read_table(path: str, need_label: bool = True) -> List[Tuple[str, Optional[str], Optional[str], int]]:
    """(text, pair, label, line) rows of a TSV, CSV or JSON Lines file (see CustomProcessor);
    without ``need_label`` the label column is optional (None where absent)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if path.endswith(".jsonl"):
                return _jsonl_rows(path, handle, need_label)
            return _delimited_rows(path, handle, need_label)
    except UnicodeDecodeError:
        raise DataError(first_invalid_utf8(path)) from None


TABLE_EXTENSIONS = (".tsv", ".csv", ".jsonl")


def read_texts(path: str) -> List[Tuple[str, Optional[str]]]:
    """The (text, pair) inputs of a file, by extension: TSV / CSV with a header and JSON Lines
    as the custom task reads them (text or sentence / sentence1, optional text_pair or
    sentence2; a label column is ignored), Amazon .review files by their review texts, and
    anything else as plain text, one example a line (a tab separating a pair's texts)."""
    if path.endswith(TABLE_EXTENSIONS):
        return [(text, pair) if (text or "").strip() else None
                for text, pair, _, _ in read_table(path, need_label=False)]
    if path.endswith(".review"):
        return [(text, None) for text in AmazonProcessor.read_review_file(path)]
    try:
        with open(path, encoding="utf-8") as handle:
            return plain_text_examples(handle)
    except UnicodeDecodeError:
        raise DataError(first_invalid_utf8(path)) from None


def plain_text_examples(lines) -> List[Optional[Tuple[str, Optional[str]]]]:
    """One example a line; a tab separates a pair's two texts. A blank line is None: an empty
    row in a prediction's output, so that output row i is always input line i."""
    examples = []
    for line in lines:
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip():
            examples.append(None)
            continue
        first, _, second = line.partition("\t")
        examples.append((first, second or None))
    return examples


def _columns(path: str, fields: Sequence[str], where: str, need_label: bool = True):
    text = _first_of(CustomProcessor.TEXT, fields)
    pair = _first_of(CustomProcessor.PAIR, fields)
    if text is None or (need_label and CustomProcessor.LABEL not in fields):
        missing = "text (or sentence)" if text is None else "label"
        raise DataError(f"{path}:{where}: no '{missing}' column (found: {', '.join(fields)})")
    return text, pair


def _delimited_rows(path: str, handle, need_label: bool = True):
    tsv = path.endswith(".tsv")
    reader = (csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
              else csv.reader(handle))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file (a header line is needed)")
    header = [h.strip() for h in header]
    text, pair = _columns(path, header, "1", need_label)
    index = {name: i for i, name in enumerate(header)}
    label = index.get(CustomProcessor.LABEL)
    rows = []
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        rows.append(_checked_row(path, line, row[index[text]], row[index[pair]] if pair else None,
                                 None if label is None else row[label].strip(), need_label))
    return rows


def _checked_row(path: str, line: int, text, pair, label, need_label: bool):
    """A training or test row must have a text and a label: an empty cell is an error naming
    the file and line (it would otherwise be an empty input, or a new class named '')."""
    if need_label and not (label or "").strip():
        raise DataError(f"{path}:{line}: empty label")
    if need_label and not (text or "").strip():
        raise DataError(f"{path}:{line}: empty text")
    return text, pair, label, line


def _jsonl_rows(path: str, handle, need_label: bool = True):
    rows = []
    for line, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line}: not JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object per line")
        text, pair = _columns(path, list(record), str(line), need_label)
        label = record.get(CustomProcessor.LABEL)
        rows.append(_checked_row(
            path, line, "" if record[text] is None else str(record[text]),
            None if pair is None or record[pair] is None else str(record[pair]),
            None if label is None else str(label).strip(), need_label))
    return rows


PROCESSORS = {"mnli": MnliProcessor, "amazon": AmazonProcessor, "custom": CustomProcessor}


def get_processor(task: str, data_dir: Optional[str] = None) -> Processor:
    """The task's processor; ``data_dir`` is needed by tasks whose domains live in the data
    (custom) and ignored by the others."""
    if task not in PROCESSORS:
        raise ValueError(f"unknown task '{task}' (expected one of {', '.join(PROCESSORS)})")
    if PROCESSORS[task] is CustomProcessor:
        if data_dir is None:
            raise ValueError("the custom task needs its data folder (--data_dir)")
        return CustomProcessor(data_dir)
    return PROCESSORS[task]()


def _check_domain(processor, domain: str):
    if domain not in processor.domains:
        raise ValueError(f"unknown {processor.name} domain '{domain}' "
                         f"(expected one of {', '.join(processor.domains)})")


_READ_CACHE: Dict[tuple, object] = {}


def _cached_read(read, path: str):
    """Parse each file once per process (MNLI's train.tsv serves five genres)."""
    stat = os.stat(path) if os.path.exists(path) else None
    key = (read.__qualname__, os.path.abspath(path), stat and stat.st_mtime_ns,
           stat and stat.st_size)
    if key not in _READ_CACHE:
        _READ_CACHE[key] = read(path)
    return _READ_CACHE[key]


# --------------------------------------------------------------------------------------------
# Features and their cache
# --------------------------------------------------------------------------------------------
FEATURE_VERSION = 1


def _file_signature(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def feature_cache_key(task: str, data_dir: str, domain: str, tokenizer: WordPieceTokenizer,
                      max_seq_length: int, train_ratio: float, dev_ratio: float,
                      data_seed: int, flip_prob: float = 0.0) -> str:
    processor = get_processor(task, data_dir)
    files = processor.files(data_dir, domain)
    with open(tokenizer.vocab_file, "rb") as handle:
        vocab_hash = hashlib.sha1(handle.read()).hexdigest()
    described = {"version": FEATURE_VERSION, "task": task, "domain": domain,
                 "files": [_file_signature(f) for f in files if os.path.exists(f)],
                 "vocab": vocab_hash, "lowercase": tokenizer.lowercase,
                 "max_seq_length": max_seq_length, "train_ratio": train_ratio,
                 "dev_ratio": dev_ratio, "data_seed": data_seed, "labels": processor.labels}
    if flip_prob:
        described["flip_prob"] = flip_prob
    digest = hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return f"{task}_{domain}_{max_seq_length}_{digest}"


def examples_to_tensors(examples: List[Example], tokenizer: WordPieceTokenizer,
                        max_seq_length: int) -> Dict[str, torch.Tensor]:
    import torch  # here: reading task facts needs no torch
    arrays = tokenizer.encode_pairs([e.text_a for e in examples],
                                    [e.text_b for e in examples], max_seq_length)
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    tensors["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return tensors


def flip_labels(examples: List[Example], num_labels: int, probability: float,
                seed: int) -> List[Example]:
    """Each label replaced by another one with ``probability`` (seeded): the label-noise study's
    unreliable domain. Only ever applied to a training split, and only when asked."""
    rng = random.Random(seed)
    flipped = []
    for example in examples:
        label = example.label
        if rng.random() < probability:
            label = rng.choice([other for other in range(num_labels) if other != label])
        flipped.append(Example(example.text_a, example.text_b, label))
    return flipped


def _cache_path(task, data_dir, domain, tokenizer, max_seq_length, train_ratio, dev_ratio,
                data_seed, cache_dir, flip_prob=0.0) -> Optional[str]:
    if not cache_dir:
        return None
    key = feature_cache_key(task, data_dir, domain, tokenizer, max_seq_length, train_ratio,
                            dev_ratio, data_seed, flip_prob)
    return os.path.join(cache_dir, key + ".pt")


def load_domain_features(task: str, data_dir: str, domain: str, tokenizer: WordPieceTokenizer,
                         max_seq_length: int, train_ratio: float = 0.9, dev_ratio: float = 0.1,
                         data_seed: int = 42, cache_dir: Optional[str] = None,
                         dist=None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Tokenized tensors of every split of one domain (see ``load_task_features``)."""
    return load_task_features(task, data_dir, [domain], tokenizer, max_seq_length, train_ratio,
                              dev_ratio, data_seed, cache_dir, dist)[domain]


def load_task_features(task: str, data_dir: str, domains: Sequence[str],
                         tokenizer: WordPieceTokenizer, max_seq_length: int,
                         train_ratio: float = 0.9, dev_ratio: float = 0.1, data_seed: int = 42,
                         cache_dir: Optional[str] = None, dist=None,
                         noisy_domain: Optional[str] = None,
                         flip_prob: float = 0.0) -> Dict[str, Dict[str, Dict[str, torch.Tensor]]]:
    """{domain: {split: tensors}}, read from / written to the cache. ``noisy_domain``'s
    training labels are flipped with ``flip_prob`` (the label-noise study; off by default).

    Every domain without a cache file is read (and so checked) before any cache file is
    written: bad data in one domain leaves nothing behind. With ``dist``
    (runtime.Distributed) rank 0 builds and writes the cache while the others wait.
    """
    processor = get_processor(task, data_dir)
    for domain in domains:
        _check_domain(processor, domain)
    noise = {d: (flip_prob if d == noisy_domain else 0.0) for d in domains}
    paths = {d: _cache_path(task, data_dir, d, tokenizer, max_seq_length, train_ratio,
                            dev_ratio, data_seed, cache_dir, noise[d]) for d in domains}
    is_main = dist is None or dist.is_main
    if dist is not None and not is_main:
        dist.barrier()
    try:
        # Ranks other than 0 read what rank 0 wrote; rank 0 rebuilds a bad file.
        cached = {d: read_feature_cache(paths[d], required=not is_main) for d in domains
                  if paths[d] and os.path.isfile(paths[d])}
        uncached = {d: processor.read_splits(data_dir, d, train_ratio, dev_ratio, data_seed)
                    for d in domains if cached.get(d) is None}
        for domain, splits in uncached.items():
            if noise[domain]:
                clean = splits["train"]
                splits["train"] = flip_labels(clean, len(processor.labels), noise[domain],
                                              data_seed + 7907)
                changed = sum(a.label != b.label for a, b in zip(clean, splits["train"]))
                logging.getLogger("hrkd").info(
                    "%s: %d of %d training labels flipped (--flip_prob %g)", domain, changed,
                    len(clean), noise[domain])
            for split, examples in splits.items():
                if not examples:
                    raise DataError(f"{data_dir}: domain '{domain}' has no {split} examples")
        features = {}
        for domain in domains:
            if domain not in uncached:
                features[domain] = cached[domain]
                continue
            features[domain] = {split: examples_to_tensors(examples, tokenizer, max_seq_length)
                                for split, examples in uncached[domain].items()}
            if paths[domain] and is_main:
                utils.atomic_torch_save(features[domain], paths[domain])
        return features
    finally:
        if dist is not None and is_main:
            dist.barrier()


FEATURE_FIELDS = ("input_ids", "segment_ids", "attention_mask", "labels")
SPLITS = ("train", "dev", "test")


def check_feature_cache(content) -> str:
    """'' when ``content`` has the shape every cache file has, else what is wrong."""
    import torch  # here: reading task facts needs no torch
    if not isinstance(content, dict) or set(content) != set(SPLITS):
        return f"expected the splits {', '.join(SPLITS)}"
    for split, tensors in content.items():
        if not isinstance(tensors, dict) or set(tensors) != set(FEATURE_FIELDS) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()):
            return f"{split}: expected the tensors {', '.join(FEATURE_FIELDS)}"
        rows = {t.shape[0] for t in tensors.values()}
        widths = {tensors[name].shape[1:] for name in FEATURE_FIELDS[:3]}
        if len(rows) != 1 or len(widths) != 1 or tensors["labels"].dim() != 1:
            return f"{split}: tensors of different lengths"
    return ""


def read_feature_cache(path: str, required: bool = False):
    """A cache file's features, or None when it is unreadable or malformed: then it is named
    in a log line and deleted, and the caller rebuilds it (a corrupt file never blocks a run).
    ``required`` (ranks that wait for rank 0's file): a bad file is an error instead."""
    import torch  # here: reading task facts needs no torch
    try:
        content = torch.load(path, weights_only=True)
        problem = check_feature_cache(content)
    except Exception as err:  # truncated zip, garbage bytes, empty file, pickled objects
        problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not problem:
        return content
    if required:
        raise DataError(f"{path}: feature cache unreadable ({problem}); delete it and rerun")
    logging.getLogger("hrkd").warning("%s: feature cache unreadable (%s); deleted, rebuilding",
                                      path, problem)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return None


def take(features: Dict[str, torch.Tensor], indices) -> Dict[str, torch.Tensor]:
    """Rows ``indices`` of every feature tensor, as int64 (what embeddings and losses take)."""
    import torch  # here: reading task facts needs no torch
    index = torch.as_tensor(indices, dtype=torch.long)
    return {name: tensor.index_select(0, index).long() for name, tensor in features.items()}


def concat_domain_batches(batches: Sequence[Dict[str, torch.Tensor]],
                          domains: Optional[Sequence[int]] = None):
    """One batch over several domains, the domain id of each row (``domains[i]`` for the rows
    of ``batches[i]``; default 0, 1, ...), and each batch's row count."""
    import torch  # here: reading task facts needs no torch
    merged = {name: torch.cat([b[name] for b in batches]) for name in batches[0]}
    sizes = [b["labels"].shape[0] for b in batches]
    domains = range(len(batches)) if domains is None else domains
    device = batches[0]["labels"].device
    domain_ids = torch.cat([torch.full((n,), d, dtype=torch.long, device=device)
                            for d, n in zip(domains, sizes)])
    return merged, domain_ids, sizes


# --------------------------------------------------------------------------------------------
# Batch sampler (REFERENCE.md section 2)
# --------------------------------------------------------------------------------------------
# Length buckets: each run of this many global batches of the shuffled stream is sorted by
# length before it is cut into batches (more: less padding, less mixing of lengths in a batch).
BUCKET_BATCHES = 50
BUCKET_STREAM = 1 << 20   # the seed word of the buckets' step order (not a domain's index)


def trim_to_longest(batches: Sequence[Dict[str, torch.Tensor]]):
    """A step's batches cut to the longest input among them (inputs are stored padded to
    --max_seq_length): one length for all domains, since the student runs them together."""
    longest = max(int(b["attention_mask"].sum(dim=1).max()) for b in batches)
    return [{name: (t[:, :longest] if name in SEQUENCE_FEATURES else t)
             for name, t in b.items()} for b in batches]


SEQUENCE_FEATURES = ("input_ids", "segment_ids", "attention_mask")


class MultiDomainBatchSampler:
    """Every step holds ``batch_size`` examples of EVERY domain, per process.

    An epoch has ceil(n_fit / (batch_size * world_size)) steps. Each domain is shuffled every
    epoch from (seed, epoch, domain), the fit domain included (the released code never shuffled
    it), and cycles through its permutation as often as the epoch needs. Rank r of a step takes
    the r-th slice of the step's global batch, so ranks see distinct examples. With one domain
    this is the single-domain sampler of stages 1 and 2 (a last partial batch is completed by
    wrapping around).
    """

    def __init__(self, domain_sizes: Sequence[int], batch_size: int, fit_domain: int = 0,
                 seed: int = 42, rank: int = 0, world_size: int = 1,
                 lengths: Optional[Sequence[np.ndarray]] = None,
                 bucket_batches: int = BUCKET_BATCHES):
        if batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {batch_size}")
        if any(size <= 0 for size in domain_sizes):
            raise ValueError(f"every domain needs training examples, got sizes {list(domain_sizes)}")
        self.domain_sizes = list(domain_sizes)
        self.batch_size = batch_size
        self.fit_domain = fit_domain
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        global_batch = batch_size * world_size
        self.steps_per_epoch = math.ceil(self.domain_sizes[fit_domain] / global_batch)
        # length buckets (--length_buckets): each example's length (its attention mask's sum)
        self.lengths = None if lengths is None else [np.asarray(x) for x in lengths]
        self.bucket_batches = bucket_batches

    def __len__(self):
        return self.steps_per_epoch

    def _domain_stream(self, epoch: int, domain: int) -> np.ndarray:
        size = self.domain_sizes[domain]
        generator = np.random.default_rng([self.seed, epoch, domain])
        permutation = generator.permutation(size)
        needed = self.steps_per_epoch * self.batch_size * self.world_size
        return np.tile(permutation, math.ceil(needed / size))[:needed]

    def _bucketed(self, stream: np.ndarray, lengths: np.ndarray, order: np.ndarray):
        """The epoch's stream regrouped into batches of similar length: each run of
        ``bucket_batches`` global batches of the shuffled stream is sorted by length (a stable
        sort: ties keep the shuffle) and cut into batches, so a batch still mixes examples
        afresh every epoch; the batches are then ranked by their longest member and placed by
        ``order`` (a permutation of the steps shared by every domain, so that one step's
        domains hold batches of the same length rank and pad to similar lengths)."""
        global_batch = self.batch_size * self.world_size
        chunk = global_batch * self.bucket_batches
        batches = []
        for start in range(0, len(stream), chunk):
            part = stream[start:start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += [part[i:i + global_batch] for i in range(0, len(part), global_batch)]
        ranked = sorted(range(len(batches)), key=lambda b: (lengths[batches[b]].max(), b))
        return np.concatenate([batches[ranked[rank]] for rank in order])

    def epoch(self, epoch: int, start_step: int = 0):
        """Yields, for each step from ``start_step``, one index array per domain."""
        streams = [self._domain_stream(epoch, d) for d in range(len(self.domain_sizes))]
        if self.lengths is not None:
            order = np.random.default_rng([self.seed, epoch, BUCKET_STREAM]).permutation(
                self.steps_per_epoch)
            streams = [self._bucketed(stream, lengths, order)
                       for stream, lengths in zip(streams, self.lengths)]
        width = self.batch_size
        for step in range(start_step, self.steps_per_epoch):
            offset = (step * self.world_size + self.rank) * width
            yield [stream[offset:offset + width] for stream in streams]


def task_fact(task: str, field: str, data_dir: Optional[str] = None) -> str:
    """A task fact as the launchers read it: ``domains`` (space-separated), ``fit_domain``,
    ``labels`` (``data_dir``: for tasks whose domains are read from the data)."""
    processor = get_processor(task, data_dir)
    if field not in ("domains", "fit_domain", "labels"):
        raise ValueError(f"unknown task fact '{field}' (domains, fit_domain or labels)")
    value = getattr(processor, field)
    return " ".join(value) if isinstance(value, list) else value


def main(argv=None) -> int:
    """``python data_processing.py fact TASK FIELD [DATA_DIR]``: a task fact, as the launchers
    ask for it (torch-free, so the query is quick)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["fact"] or len(argv) not in (3, 4):
        print("usage: data_processing.py fact TASK domains|fit_domain|labels [DATA_DIR] "
              "(the demo corpus: sample_corpus.py)", file=sys.stderr)
        return 2
    try:
        print(task_fact(*argv[1:]))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
