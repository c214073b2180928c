"""The deployed forms (issue 24): ONNX and int8 export checked against PyTorch, predict.py on
ONNX Runtime with the same output, batching by length, and bad inputs in one line."""
import importlib
import json
import os

import numpy as np
import pytest
import torch

import deploy
import export
import predict
import train_multi_domain
from conftest import tiny_teacher_args, train_tiny_runs
from modeling import model_from_checkpoint
from tokenization import WordPieceTokenizer

TEXTS = ["i love this sturdy blender , great !", "terrible flimsy knife . waste",
         "the novel was gripping and insightful and long and very good indeed", "zzz ."]


@pytest.fixture(scope="module")
def runs(sample, tmp_path_factory):
    return train_tiny_runs(sample, tmp_path_factory.mktemp("deploy_runs"))


@pytest.fixture(scope="module")
def single(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("deployed") / "single"
    assert export.main([str(runs / "single"), "--out", str(out), "--quantize", "int8"]) == 0
    return out


def session_logits(path, features):
    return deploy.OnnxBackend(str(path)).logits(features)


def test_onnx_export_matches_pytorch_and_carries_its_metadata(runs, single):
    assert {"model.onnx", "model.int8.onnx", "model.safetensors"} <= set(os.listdir(single))
    metadata = deploy.onnx_metadata(str(single / "model.onnx"))
    assert json.loads(metadata["labels"]) == ["negative", "positive"]
    assert metadata["max_seq_length"] == "32" and metadata["task"] == "amazon"
    model = model_from_checkpoint(str(runs / "single" / "best_model.bin")).eval()
    for batch, length in ((1, 5), (5, 32), (2, 19)):  # both axes are dynamic
        ids, segments, mask = deploy.sample_inputs(model.config.vocab_size, batch, length, 7)
        with torch.no_grad():
            expected = model(ids, segments, mask, score_layers=(), fit=False).logits.numpy()
        got = session_logits(single / "model.onnx", {"input_ids": ids.numpy(), "segment_ids":
                                                     segments.numpy(),
                                                     "attention_mask": mask.numpy()})
        assert got.shape == (batch, 2) and np.abs(got - expected).max() <= 1e-4
    # int8 is a quarter of the weights' size or less (the embeddings included)
    assert os.path.getsize(single / "model.int8.onnx") < 0.5 * os.path.getsize(single / "model.onnx")


def test_every_domain_of_a_multi_domain_run_gets_its_head(runs, tmp_path):
    out = tmp_path / "multi"
    assert export.main([str(runs / "multi"), "--all_domains", "--out", str(out),
                        "--onnx"]) == 0
    domains = sorted(os.listdir(out))
    assert domains == ["books", "dvd", "electronics", "kitchen"]
    features = WordPieceTokenizer(str(runs / "multi" / "vocab.txt")).encode_pairs(
        TEXTS, None, 32)
    tensors = [torch.from_numpy(features[k]).long()
               for k in ("input_ids", "segment_ids", "attention_mask")]
    for index, domain in enumerate(domains):
        assert deploy.onnx_metadata(str(out / domain / "model.onnx"))["domain"] == domain
        model = model_from_checkpoint(str(runs / "multi" / f"best_model_{domain}.bin")).eval()
        with torch.no_grad():
            expected = model(*tensors, domain=index).logits.numpy()
        assert np.abs(session_logits(out / domain / "model.onnx", features)
                      - expected).max() <= 1e-4


def predict_rows(capsys, *argv):
    assert predict.main([*argv, *TEXTS]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    return rows[0], rows[1:]


def test_predict_on_onnx_runtime_gives_pytorchs_output(single, capsys):
    header, torch_rows = predict_rows(capsys, str(single), "--backend", "torch")
    header_onnx, onnx_rows = predict_rows(capsys, str(single), "--backend", "onnx")
    _, auto_rows = predict_rows(capsys, str(single))  # auto: the folder has model.onnx
    _, int8_rows = predict_rows(capsys, str(single), "--int8")
    assert header == header_onnx == ["text", "text_b", "label", "p_negative", "p_positive"]
    for rows in (onnx_rows, auto_rows, int8_rows):
        assert [r[0] for r in rows] == [r[0] for r in torch_rows]  # input order kept
    for mine, reference in zip(onnx_rows, torch_rows):
        assert mine[2] == reference[2]
        assert max(abs(float(a) - float(b)) for a, b in zip(mine[3:], reference[3:])) <= 1e-5
    for row in int8_rows:
        assert sum(float(p) for p in row[3:]) == pytest.approx(1.0, abs=1e-5)


def test_length_batches_pad_each_batch_to_its_own_longest(runs):
    model = model_from_checkpoint(str(runs / "single" / "best_model.bin")).eval()
    features = WordPieceTokenizer(str(runs / "single" / "vocab.txt")).encode_pairs(
        TEXTS * 3, None, 32)
    seen = []

    class Recorder(deploy.TorchBackend):
        def logits(self, batch):
            seen.append(batch["input_ids"].shape)
            return super().logits(batch)

    batched = deploy.predict_features(Recorder(model, None), features, batch_size=4)
    whole = deploy.TorchBackend(model, None).logits(features)  # one batch padded to 32
    assert np.abs(batched - whole).max() <= 1e-5
    lengths = sorted(features["attention_mask"].sum(axis=1), reverse=True)
    assert [shape for shape in seen] == [(4, lengths[0]), (4, lengths[4]), (4, lengths[8])]


def test_a_folder_without_the_onnx_model_is_named(single, tmp_path, capsys):
    folder = tmp_path / "hf"
    os.makedirs(folder)
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        os.link(single / name, folder / name)
    assert predict.main([str(folder), "--backend", "onnx", "text"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{folder}/model.onnx: no such ONNX model" in err
    assert predict.main([str(folder), "--int8", "text"]) == 1
    assert "model.int8.onnx: no such ONNX model" in capsys.readouterr().err
    assert predict.main([str(folder), "text"]) == 0  # auto falls back to PyTorch


def test_a_corrupt_onnx_file_is_named(single, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    os.makedirs(folder)
    for name in ("config.json", "vocab.txt"):
        os.link(single / name, folder / name)
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    assert predict.main([str(folder), "text"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{folder}/model.onnx: not a readable ONNX model" in err


def test_a_missing_extra_is_one_line_and_writes_nothing(runs, tmp_path, monkeypatch, capsys):
    real = importlib.import_module

    def without_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_onnx)
    out = tmp_path / "hf"
    assert export.main([str(runs / "single"), "--out", str(out), "--onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "onnx is not installed" in err and "pip install" in err
    assert not out.exists()


def test_an_export_that_disagrees_with_pytorch_is_not_kept(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "CHECK_TOLERANCE", -1.0)
    out = tmp_path / "hf"
    assert export.main([str(runs / "single"), "--out", str(out), "--onnx"]) == 1
    assert "differ from PyTorch's" in capsys.readouterr().err
    assert not (out / "model.onnx").exists() and not (out / "model.onnx.partial").exists()


# The accuracy-speed-size picture ------------------------------------------------------------
def test_hugging_face_form_computes_our_logits(runs):
    import deploy_bench
    model = model_from_checkpoint(str(runs / "single" / "best_model.bin")).eval()
    features = WordPieceTokenizer(str(runs / "single" / "vocab.txt")).encode_pairs(
        TEXTS, None, 32)
    ours = deploy_bench.torch_form(model)(features)
    theirs = deploy_bench.hf_form(model)(features)
    assert np.abs(ours - theirs).max() <= 1e-5


def test_bench_deploy_case_measures_every_form(tmp_path):
    import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--cases", "deploy", "--deploy_sizes", "tiny", "--deploy_texts", "8",
                       "--deploy_batches", "1", "--infer_batch", "4", "--seq_len", "32",
                       "--out", str(out)]) == 0
    deploy_results = json.loads(out.read_text())["deploy"]
    tiny = deploy_results["sizes"]["tiny"]
    assert {"teacher_torch_fp32", "student_hf_fp32", "student_torch_fp32", "student_onnx_fp32",
            "student_onnx_int8"} <= set(tiny["forms"])
    for form in tiny["forms"].values():
        assert form["batch1"]["requests"] == 8 and form["batch1"]["p90_ms"] > 0
        assert form["bulk"]["batch"] == 4 and form["bulk"]["examples_per_s"] > 0
    assert tiny["vs_hf_student_fp32"]["student_hf_fp32"]["batch1_speedup"] == 1.0
    assert tiny["size_mb"]["student_onnx_int8"] < tiny["size_mb"]["student_onnx_fp32"]


def test_deploy_eval_reports_each_forms_accuracy_and_the_tradeoff(sample, runs, tmp_path,
                                                                  capsys):
    import deploy_eval
    import report
    root = tmp_path / "runs"
    run = root / "train_multi_domain" / "amazon" / "seed42"
    args = tiny_teacher_args(sample, run, 3, "--learning_rate", "1e-3", "--do_train",
                             "--do_test")
    assert train_multi_domain.main(args) == 0
    assert deploy_eval.main([str(run), "--latency_texts", "5"]) == 0
    record = json.load(open(run / "deployment.json"))
    test = json.load(open(run / "results.json"))["test"]["per_domain"]
    # PyTorch and ONNX Runtime fp32 give the run's own test accuracy on every domain
    for form in ("torch_fp32", "onnx_fp32"):
        assert record["forms"][form]["accuracy"] == pytest.approx(test, abs=1e-6)
    assert set(record["int8_minus_fp32_points"]) == set(test)
    assert record["forms"]["onnx_int8"]["size_mb"] < record["forms"]["onnx_fp32"]["size_mb"]
    text = report.report(str(root), str(tmp_path / "report"), ["amazon"])
    assert "| train_multi_domain/amazon/seed42 | ONNX Runtime int8 |" in text
    assert (tmp_path / "report" / "tradeoff_amazon.png").stat().st_size > 1000
    capsys.readouterr()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    assert deploy_eval.main([str(unfinished)]) == 1
    assert "not a finished run" in capsys.readouterr().err


def test_int8_quantizes_the_fused_graph_and_falls_back_to_the_plain_one(single, tmp_path,
                                                                          monkeypatch):
    config = json.load(open(single / "config.json"))
    args = (config["num_attention_heads"], config["hidden_size"], config["vocab_size"])
    fused = deploy.fused_graph(str(single / "model.onnx"), str(tmp_path / "fused.onnx"), *args)
    assert fused == str(tmp_path / "fused.onnx")  # the BERT fusions apply to our graph
    monkeypatch.setattr(deploy, "CHECK_TOLERANCE", -1.0)  # no fused graph is ever accepted
    assert deploy.fused_graph(str(single / "model.onnx"), str(tmp_path / "again.onnx"),
                              *args) is None
    deploy.write_int8(str(single / "model.onnx"), str(tmp_path / "int8.onnx"), *args)
    logits = session_logits(tmp_path / "int8.onnx", WordPieceTokenizer(
        str(single / "vocab.txt")).encode_pairs(TEXTS, None, 32))
    assert logits.shape == (len(TEXTS), 2) and not (tmp_path / "int8.onnx.fused.onnx").exists()
