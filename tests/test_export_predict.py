"""Export to transformers and back; prediction from run directories and exported folders."""
import io
import json
import os
import sys

import pytest
import torch
import transformers

import export
import predict
from conftest import train_tiny_runs
from tokenization import WordPieceTokenizer
from modeling import model_from_checkpoint

TEXTS = ["i love this sturdy blender , great !", "terrible flimsy knife . waste",
         "the novel was gripping and insightful", "unknownword zzz ."]


@pytest.fixture(scope="module")
def runs(sample, tmp_path_factory):
    return train_tiny_runs(sample, tmp_path_factory.mktemp("export_runs"))


def our_logits(checkpoint, vocab, head):
    model = model_from_checkpoint(str(checkpoint)).eval()
    features = WordPieceTokenizer(str(vocab)).encode_pairs(TEXTS, None, 32)
    inputs = [torch.from_numpy(features[k]).long()
              for k in ("input_ids", "segment_ids", "attention_mask")]
    with torch.no_grad():
        return model(*inputs, domain=head).logits


def hf_logits(folder):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(TEXTS, max_length=32, padding="max_length", truncation=True,
                        return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits, model.config


def test_single_domain_round_trip(runs, tmp_path):
    out = tmp_path / "hf"
    assert export.main([str(runs / "single"), "--out", str(out)]) == 0
    logits, config = hf_logits(str(out))
    expected = our_logits(runs / "single" / "best_model.bin", runs / "single" / "vocab.txt", None)
    assert (logits - expected).abs().max() <= 1e-5
    assert config.id2label == {0: "negative", 1: "positive"}
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer_config.json",
                                       "vocab.txt"]


def test_all_domains_round_trip(runs, tmp_path):
    out = tmp_path / "hf_all"
    assert export.main([str(runs / "multi"), "--all_domains", "--out", str(out)]) == 0
    domains = ["books", "dvd", "electronics", "kitchen"]
    assert sorted(os.listdir(out)) == domains
    for head, domain in enumerate(domains):
        logits, _ = hf_logits(str(out / domain))
        expected = our_logits(runs / "multi" / f"best_model_{domain}.bin",
                              runs / "multi" / "vocab.txt", head)
        assert (logits - expected).abs().max() <= 1e-5


def test_multi_domain_export_needs_a_domain(runs, tmp_path, capsys):
    assert export.main([str(runs / "multi"), "--out", str(tmp_path / "x")]) == 1
    assert "pass --domain" in capsys.readouterr().err


def run_predict(args, stdin_text=None, capsys=None, monkeypatch=None):
    if stdin_text is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    assert predict.main(args) == 0
    return capsys.readouterr().out


def test_predict_from_run_and_export_agree(runs, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "hf_dvd"
    assert export.main([str(runs / "multi"), "--domain", "dvd", "--out", str(folder)]) == 0
    capsys.readouterr()
    from_run = run_predict([str(runs / "multi"), "--domain", "dvd", "--format", "jsonl",
                            *TEXTS], capsys=capsys)
    from_export = run_predict([str(folder), "--format", "jsonl"],
                              stdin_text="\n".join(TEXTS) + "\n", capsys=capsys,
                              monkeypatch=monkeypatch)
    run_records = [json.loads(line) for line in from_run.splitlines()]
    export_records = [json.loads(line) for line in from_export.splitlines()]
    assert [r["text"] for r in run_records] == TEXTS
    for a, b in zip(run_records, export_records):
        assert a["label"] == b["label"]
        for label in ("negative", "positive"):
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-6)
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_predict_tsv_from_file_with_pairs(runs, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("first text\tsecond text\n\nonly one\n")
    out = tmp_path / "out.tsv"
    assert predict.main([str(runs / "single"), "--file", str(path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "text\ttext_b\tlabel\tp_negative\tp_positive"
    assert lines[1].startswith("first text\tsecond text\t") and len(lines) == 4
    assert lines[2] == "\t\t\t\t" and lines[3].startswith("only one\t")  # the blank line's row
    assert predict.main([str(runs / "single"), "--file", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: input file not found" in capsys.readouterr().err
