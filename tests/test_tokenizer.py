"""Tokenizer ids equal transformers.BertTokenizer's (and its legacy Python implementation's)."""
import numpy as np
import pytest
import transformers

from tokenization import WordPieceTokenizer

TEXTS = [
    "Hello, World! It's a test.",
    "Café déjà vu — naïve façade, Ångström and Über.",
    "Control\x00chars\x07 and\ttabs\r\nnewlines\u200b here\ufffd.",
    "Punctuation!!! (brackets) [square] {curly} <angle> @home #tag $5.00 100% a&b",
    "unbelievablyyyyyyyyyyyyyyyyy " + "x" * 120 + " supercalifragilisticexpialidocious",
    "Mixed 中文 characters and 日本語 text.",
    "  leading and trailing spaces   ",
    "\"Unbalanced quote, he said.",
    "",
    "emoji 😀 and symbols ™ © ½",
]


@pytest.fixture(scope="module")
def tokenizers_pair(minilm_dir):
    vocab = f"{minilm_dir}/vocab.txt"
    ours = WordPieceTokenizer(vocab, lowercase=True)
    fast = transformers.BertTokenizer(vocab, do_lower_case=True)
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    legacy = BertTokenizerLegacy(vocab, do_lower_case=True)
    return ours, fast, legacy


def test_single_text_ids(tokenizers_pair):
    ours, fast, legacy = tokenizers_pair
    for text in TEXTS:
        mine = ours.tokenize_ids([text])[0]
        assert mine == fast.encode(text, add_special_tokens=False), text
        assert mine == legacy.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("max_len", [8, 13, 32, 128])
def test_pair_features_with_truncation(tokenizers_pair, max_len):
    """Pair truncation follows Google BERT's heuristic, which the Python BertTokenizer keeps.

    The Rust-backed transformers 5 BertTokenizer splits an odd removal count the other way
    round when it truncates pairs, so it is the reference only where nothing is cut.
    """
    ours, fast, legacy = tokenizers_pair
    first = TEXTS[:6] + ["a b c d e f g h i j", "short"]
    second = [t for t in TEXTS[3:10] if t] + ["one two", "the other part is much longer"]
    features = ours.encode_pairs(first, second, max_len)
    for row, (a, b) in enumerate(zip(first, second)):
        fits = len(legacy.encode(a, b)) <= max_len
        for reference in ((fast, legacy) if fits else (legacy,)):
            expected = reference(a, b, max_length=max_len, truncation="longest_first",
                                 padding="max_length", return_token_type_ids=True)
            np.testing.assert_array_equal(features["input_ids"][row], expected["input_ids"])
            np.testing.assert_array_equal(features["segment_ids"][row],
                                          expected["token_type_ids"])
            np.testing.assert_array_equal(features["attention_mask"][row],
                                          expected["attention_mask"])


def test_truncation_takes_from_the_longer_part_then_from_b():
    from tokenization import truncate_pair
    assert truncate_pair([1] * 10, [2] * 30, 5) == ([1] * 3, [2] * 2)
    assert truncate_pair([1] * 4, [2] * 4, 7) == ([1] * 4, [2] * 3)
    assert truncate_pair([1] * 9, [2] * 2, 6) == ([1] * 4, [2] * 2)


def test_empty_second_text_is_a_single_text_input(tokenizers_pair):
    """Google's BERT tests ``if text_b``: an empty hypothesis gives [CLS] a [SEP] only."""
    ours, fast, _ = tokenizers_pair
    pair = ours.encode_pairs(["a premise here"], [""], 12)
    single = ours.encode_pairs(["a premise here"], None, 12)
    np.testing.assert_array_equal(pair["input_ids"], single["input_ids"])
    np.testing.assert_array_equal(pair["input_ids"][0],
                                  fast("a premise here", "", max_length=12,
                                       padding="max_length")["input_ids"])


def test_single_features_truncate_and_pad(tokenizers_pair):
    ours, fast, _ = tokenizers_pair
    features = ours.encode_pairs(TEXTS, None, 10)
    for row, text in enumerate(TEXTS):
        expected = fast(text, max_length=10, truncation=True, padding="max_length", return_token_type_ids=True)
        np.testing.assert_array_equal(features["input_ids"][row], expected["input_ids"])
        assert features["segment_ids"][row].sum() == 0


def test_cased_vocabulary_keeps_case(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "Hello", "hello", "é",
                                "e", "##llo", "H"]) + "\n")
    cased = WordPieceTokenizer(str(vocab), lowercase=False)
    assert cased.tokenize("Hello hello é") == ["Hello", "hello", "é"]
    uncased = WordPieceTokenizer(str(vocab), lowercase=True)
    assert uncased.tokenize("Hello é") == ["hello", "e"]


def test_missing_vocab_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: vocabulary file not found"):
        WordPieceTokenizer(str(tmp_path / "nope.txt"))
