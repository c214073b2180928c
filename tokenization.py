"""The tokenizer and the model inputs it makes (REFERENCE.md section 2): BERT's WordPiece over a
vocab.txt, pair truncation, [CLS] a [SEP] b [SEP] with segment ids and padding to exactly T.
Torch-free (NumPy arrays out); the readers (data_processing.py) turn them into tensors.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_vocab(path: str) -> Dict[str, int]:
    """Token -> id, one token per line in id order (the format of BERT's vocab.txt)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: vocabulary file not found")
    vocab: Dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.rstrip("\n")] = index
    for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if token not in vocab:
            raise ValueError(f"{path}: vocabulary has no {token} token")
    return vocab


class WordPieceTokenizer:
    """Google BERT's basic + WordPiece tokenization, run by the `tokenizers` library.

    Clean text, whitespace split, optional lower-casing and accent stripping, punctuation split,
    CJK ideographs isolated, greedy longest-match-first WordPiece with ``##`` continuations,
    [UNK] for unmatched words and words over 100 characters: the same ids as
    ``transformers.BertTokenizer``.
    """

    def __init__(self, vocab_file: str, lowercase: bool = True):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        self.vocab_file = vocab_file
        self.vocab = load_vocab(vocab_file)
        self.lowercase = lowercase
        backend = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]",
                                             max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
            lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.backend = backend
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]

    def __len__(self):
        """Number of ids (vocab.txt lines; a repeated token keeps its last id, as BERT's does)."""
        return max(self.vocab.values()) + 1

    def tokenize_ids(self, texts: Sequence[str]) -> List[List[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def tokenize(self, text: str) -> List[str]:
        return self.backend.encode(text, add_special_tokens=False).tokens

    def encode_pairs(self, texts_a: Sequence[str], texts_b: Optional[Sequence[Optional[str]]],
                     max_seq_length: int) -> Dict[str, np.ndarray]:
        """Features for single texts or pairs, padded to exactly ``max_seq_length``."""
        ids_a = self.tokenize_ids(texts_a)
        ids_b = [None] * len(ids_a)
        if texts_b is not None:
            # An empty or missing second text means a single-text input, as in Google's BERT.
            tokenized = self.tokenize_ids([t or "" for t in texts_b])
            ids_b = [ids if text else None for ids, text in zip(tokenized, texts_b)]
        count = len(ids_a)
        input_ids = np.full((count, max_seq_length), self.pad_id, dtype=np.int32)
        segment_ids = np.zeros((count, max_seq_length), dtype=np.int32)
        attention_mask = np.zeros((count, max_seq_length), dtype=np.int32)
        for row, (first, second) in enumerate(zip(ids_a, ids_b)):
            tokens, segments = build_inputs(first, second, max_seq_length, self.cls_id,
                                            self.sep_id)
            input_ids[row, :len(tokens)] = tokens
            segment_ids[row, :len(tokens)] = segments
            attention_mask[row, :len(tokens)] = 1
        return {"input_ids": input_ids, "segment_ids": segment_ids,
                "attention_mask": attention_mask}


def truncate_pair(first: List[int], second: List[int], max_tokens: int):
    """Remove one token at a time from the longer part (from ``second`` when equal).

    This keeps as much of each part as the budget allows; a short sentence is not cut while a
    long one still has tokens to give, which is Google BERT's heuristic.
    """
    first, second = list(first), list(second)
    while len(first) + len(second) > max_tokens:
        if len(first) > len(second):
            first.pop()
        else:
            second.pop()
    return first, second


def build_inputs(first: List[int], second: Optional[List[int]], max_seq_length: int,
                 cls_id: int, sep_id: int) -> Tuple[List[int], List[int]]:
    """[CLS] a [SEP] (b [SEP]) with segment ids 0 for a's part and 1 for b's."""
    if second is None:
        first = first[:max_seq_length - 2]
        return [cls_id] + first + [sep_id], [0] * (len(first) + 2)
    first, second = truncate_pair(first, second, max_seq_length - 3)
    tokens = [cls_id] + first + [sep_id] + second + [sep_id]
    return tokens, [0] * (len(first) + 2) + [1] * (len(second) + 1)
