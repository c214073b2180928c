"""What deploying a trained model costs and gains: the test accuracy of each deployed form, per
domain, beside its batch-1 latency and its size on disk.

Reads  a finished run directory of any stage (its config.json for the task, data, sequence
       length and splits; its best checkpoint of each domain), and the data (--data_dir, else
       the run's).
Writes --out (default: <run>/deployment.json): per form (PyTorch fp32, PyTorch bf16 where
       the CPU computes it natively, ONNX Runtime fp32, ONNX Runtime int8) each domain's test
       accuracy, the mean, the batch-1 latency (median and p90 over --latency_texts test
       reviews, each at its own length) and the shipped file's size; and int8's accuracy
       minus fp32's per domain, in points. report.py draws accuracy against latency and size from these
       files (tradeoff_<task>.png).

    python deploy_eval.py runs/finetune_multi_domain/amazon/hrkd/seed42
    python deploy_eval.py runs/finetune_domain/amazon/books/seed42 --latency_texts 100
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch

import deploy
import deploy_bench
import runtime
import utils
from export import checkpoint_for, export_one, run_settings
from modeling import model_from_checkpoint, read_checkpoint
from tokenization import WordPieceTokenizer

DEPLOYMENT_FILE = "deployment.json"


def run_domains(run_dir: str) -> List[str]:
    settings = utils.read_json(os.path.join(run_dir, "config.json"), {}) or {}
    return list(settings.get("domains") or [])


def test_features(settings: dict, data_dir: str, domain: str, tokenizer) -> Dict[str, np.ndarray]:
    """The run's test split of ``domain``, tokenized as the run tokenized it."""
    from data_processing import get_processor
    processor = get_processor(settings["task"], data_dir)
    split = processor.read_splits(data_dir, domain, settings.get("train_ratio", 0.9),
                                  settings.get("dev_ratio", 0.1),
                                  settings.get("data_seed", 42))["test"]
    features = tokenizer.encode_pairs([e.text_a for e in split], [e.text_b for e in split],
                                      settings.get("max_seq_length", 128))
    features["labels"] = np.array([e.label for e in split])  # label ids, as the stages read them
    features["texts"] = [e.text_a for e in split]
    return features


def evaluate_run(run_dir: str, data_dir: Optional[str] = None, latency_texts: int = 200,
                 batch_size: int = 64) -> dict:
    status = utils.run_status(run_dir)
    if status["state"] != "finished":
        raise ValueError(f"{run_dir}: not a finished run ({utils.describe_status(status)})")
    settings = run_settings(run_dir)
    data_dir = data_dir or settings.get("data_dir")
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: data folder not found (pass --data_dir)")
    deploy.require("onnxruntime.quantization")
    domains = run_domains(run_dir)
    tokenizer = WordPieceTokenizer(os.path.join(run_dir, "vocab.txt"),
                                   lowercase=settings.get("lowercase", True))
    native = runtime.native_bf16(torch.device("cpu"))
    forms: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="deploy-eval-") as scratch:
        for index, domain in enumerate(domains):
            checkpoint = checkpoint_for(run_dir, domain if len(domains) > 1 else None)
            model = model_from_checkpoint(checkpoint).eval()
            head = None if model.num_domains is None else domains.index(domain)
            folder = export_one(checkpoint, domain if head is not None else None,
                                os.path.join(scratch, domain),
                                os.path.join(run_dir, "vocab.txt"),
                                settings.get("lowercase", True),
                                settings.get("max_seq_length", 128), quantize="int8")
            backends = {"torch_fp32": deploy.TorchBackend(model, head)}
            if native:
                backends["torch_bf16"] = deploy.TorchBackend(model, head, amp="bf16")
            backends["onnx_fp32"] = deploy.OnnxBackend(deploy.onnx_file_of(folder, False))
            backends["onnx_int8"] = deploy.OnnxBackend(deploy.onnx_file_of(folder, True))
            features = test_features(settings, data_dir, domain, tokenizer)
            texts = features.pop("texts")
            for name, backend in backends.items():
                entry = forms.setdefault(name, {"accuracy": {}})
                logits = deploy.predict_features(backend, features, batch_size)
                entry["accuracy"][domain] = float(
                    (logits.argmax(axis=1) == features["labels"]).mean())
                if index == 0:  # speed and size do not depend on the domain
                    requests = deploy_bench.encode_each(tokenizer, texts[:latency_texts],
                                                        settings.get("max_seq_length", 128))
                    entry["batch1"] = deploy_bench.latency(backend.logits, requests)
                    entry["size_mb"] = deploy.file_size_mb(os.path.join(folder, {
                        "onnx_fp32": deploy.ONNX_FILE, "onnx_int8": deploy.INT8_FILE}.get(
                            name, "model.safetensors")))
            print(f"{domain}: " + " ".join(f"{name} {100 * forms[name]['accuracy'][domain]:.1f}"
                                           for name in backends), file=sys.stderr)
    for entry in forms.values():
        entry["mean"] = float(np.mean(list(entry["accuracy"].values())))
    int8_change = {d: 100 * (forms["onnx_int8"]["accuracy"][d] - forms["torch_fp32"]["accuracy"][d])
                   for d in domains}
    return {"run": os.path.abspath(run_dir), "stage": read_checkpoint(
                checkpoint_for(run_dir, domains[0] if len(domains) > 1 else None)).get("stage"),
            "task": settings.get("task"), "domains": domains,
            "max_seq_length": settings.get("max_seq_length"), "forms": forms,
            "int8_minus_fp32_points": int8_change, "threads": torch.get_num_threads(),
            "bf16": "measured" if native else "skipped: no native bf16 on this CPU",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
                       + f", {os.cpu_count()} CPUs",
            "latency_texts": latency_texts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--data_dir", help="default: the run's --data_dir")
    parser.add_argument("--out", help=f"default: <run>/{DEPLOYMENT_FILE}")
    parser.add_argument("--latency_texts", type=int, default=200,
                        help="test reviews timed one at a time (batch 1)")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="examples per forward for the accuracy (batched by length)")
    args = parser.parse_args(argv)

    def run():
        if not os.path.isdir(args.run):
            raise FileNotFoundError(f"{args.run}: no run directory")
        result = evaluate_run(args.run, args.data_dir, args.latency_texts, args.batch_size)
        out = args.out or os.path.join(args.run, DEPLOYMENT_FILE)
        utils.atomic_write_json(out, result)
        for name, entry in result["forms"].items():
            print(f"{name:11s} mean test {100 * entry['mean']:.1f}  batch 1 "
                  f"{entry['batch1']['median_ms']:.2f} ms  {entry['size_mb']:.1f} MiB")
        print("int8 minus fp32 (test accuracy points): " + ", ".join(
            f"{d} {v:+.1f}" for d, v in result["int8_minus_fp32_points"].items()))
        print(out)

    return utils.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
