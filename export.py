"""Export a trained teacher or student to a Hugging Face `transformers` folder (and ONNX).

Reads  a run directory of any stage (or one checkpoint file). A multi-domain run exports one
       domain's head from the checkpoint best on that domain (--domain), or every domain into
       its own folder (--all_domains); a single-domain run exports best_model.bin.
Writes --out (or --out/<domain> with --all_domains): config.json (BertForSequenceClassification,
       label names), model.safetensors, vocab.txt, tokenizer_config.json,
       special_tokens_map.json. A student's fit maps (used only for distillation) are dropped.
       --onnx adds model.onnx (deploy.py: dynamic batch and sequence axes, the labels, the
       run's sequence length, the domain and the task in its metadata), checked against
       PyTorch's logits (fp32, to 1e-4) before it is kept; --quantize int8 adds
       model.int8.onnx, dynamically quantized by ONNX Runtime (and implies --onnx).

    python export.py runs/finetune_multi_domain/amazon/hrkd/seed42 --domain books --out hf/books
    python export.py runs/finetune_multi_domain/amazon/hrkd/seed42 --all_domains --out hf/hrkd
    python export.py runs/finetune_domain/amazon/books/seed42 --out hf/books --quantize int8

The folder then loads with transformers.AutoModelForSequenceClassification / AutoTokenizer and
gives this project's logits, and predict.py reads it too.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Dict, List, Optional

import torch

import utils
from utils import best_model_name
from modeling import (BertClassifier, CheckpointError, find_weights_file, model_from_checkpoint,
                      read_checkpoint, to_hf_name)

# Our activation names -> names transformers knows.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_tanh": "gelu_pytorch_tanh",
                  "gelu_pytorch_tanh": "gelu_pytorch_tanh", "gelu_fast": "gelu_fast",
                  "relu": "relu"}


def checkpoint_for(source: str, domain: Optional[str]) -> str:
    """The checkpoint to export: a file as given, or the run's best (on ``domain``)."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source}: no run directory or checkpoint file")
    if domain is not None:
        per_domain = os.path.join(source, best_model_name(domain))
        if os.path.isfile(per_domain):
            return per_domain
    return find_weights_file(os.path.join(source, best_model_name()))


def hf_state_dict(model: BertClassifier, head: Optional[int]) -> Dict[str, torch.Tensor]:
    """BertForSequenceClassification weights: ``bert.*`` plus one ``classifier``."""
    weights = {}
    for name, tensor in model.state_dict().items():
        hf_name = to_hf_name(name)
        if hf_name is not None:
            weights["bert." + hf_name] = tensor.detach().contiguous().clone()
    classifier = model.classifier if head is None else model.classifiers[head]
    weights["classifier.weight"] = classifier.weight.detach().contiguous().clone()
    weights["classifier.bias"] = classifier.bias.detach().contiguous().clone()
    return weights


def hf_config(model: BertClassifier, labels: List[str], lowercase: bool) -> dict:
    config = model.config.to_dict()
    config["hidden_act"] = HF_ACTIVATIONS.get(config["hidden_act"], config["hidden_act"])
    config.update({
        "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "num_labels": len(labels), "id2label": {str(i): l for i, l in enumerate(labels)},
        "label2id": {l: i for i, l in enumerate(labels)},
        "position_embedding_type": "absolute", "classifier_dropout": None,
        "problem_type": "single_label_classification", "do_lower_case": lowercase})
    return config


def write_tokenizer_files(out_dir: str, vocab_file: str, lowercase: bool,
                          max_length: int):
    """vocab.txt and tokenizer configs; ``model_max_length`` is the run's --max_seq_length."""
    shutil.copyfile(vocab_file, os.path.join(out_dir, "vocab.txt"))
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "cls_token": "[CLS]", "mask_token": "[MASK]"}
    utils.atomic_write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    utils.atomic_write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
        "strip_accents": None, "tokenize_chinese_chars": True,
        "model_max_length": max_length, **special})


def export_one(checkpoint: str, domain: Optional[str], out_dir: str, vocab_file: str,
               lowercase: bool, max_length: int, onnx: bool = False,
               quantize: Optional[str] = None) -> str:
    from safetensors.torch import save_file
    content = read_checkpoint(checkpoint)
    model = model_from_checkpoint(checkpoint).eval()
    labels = content.get("labels") or [f"LABEL_{i}" for i in range(model.num_labels)]
    domains = content.get("domains") or []
    head = None
    if model.num_domains is not None:
        domain = domain or utils.domain_of_checkpoint(checkpoint, domains)
        if domain is None:
            raise ValueError(f"{checkpoint}: a multi-domain model; pass --domain "
                             f"({', '.join(domains)}) or --all_domains")
        if domain not in domains:
            raise ValueError(f"{checkpoint}: no domain '{domain}' (has {', '.join(domains)})")
        head = domains.index(domain)
    os.makedirs(out_dir, exist_ok=True)
    weights = hf_state_dict(model, head)
    utils.atomic_write_with(os.path.join(out_dir, "model.safetensors"),
                            lambda path: save_file(weights, path, metadata={"format": "pt"}))
    config = hf_config(model, labels, lowercase)
    config["hrkd_source"] = {"checkpoint": os.path.abspath(checkpoint), "domain": domain,
                             "task": content.get("task")}
    utils.atomic_write_json(os.path.join(out_dir, "config.json"), config)
    length = min(max_length, model.config.max_position_embeddings)
    write_tokenizer_files(out_dir, vocab_file, lowercase, length)
    if onnx or quantize:
        import deploy
        metadata = deploy.export_metadata(labels, length, domain, content.get("task"),
                                          lowercase)
        onnx_path = os.path.join(out_dir, deploy.ONNX_FILE)
        difference = deploy.write_onnx(model, head, onnx_path, metadata, length)
        print(f"{onnx_path}: logits within {difference:.1e} of PyTorch's", file=sys.stderr)
        if quantize == "int8":
            deploy.int8_from(model, onnx_path, os.path.join(out_dir, deploy.INT8_FILE))
    return out_dir


def run_settings(source: str) -> dict:
    """The run's resolved flags (config.json of a run directory), if there is one."""
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    config = utils.read_json(os.path.join(folder, "config.json"), {}) or {}
    return config.get("args", {})


def export(source: str, out: str, domain: Optional[str] = None, all_domains: bool = False,
           vocab_file: Optional[str] = None, onnx: bool = False,
           quantize: Optional[str] = None) -> List[str]:
    if onnx or quantize:  # a missing extra stops the export before anything is written
        import deploy
        deploy.require("onnx")
        deploy.require("onnxruntime.quantization" if quantize else "onnxruntime")
    settings = run_settings(source)
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    vocab_file = vocab_file or os.path.join(folder, "vocab.txt")
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"{vocab_file}: vocabulary file not found (pass --vocab_file)")
    lowercase = settings.get("lowercase", True)
    max_length = settings.get("max_seq_length", 128)
    if all_domains:
        content = read_checkpoint(checkpoint_for(source, None))
        domains = content.get("domains") or []
        if len(domains) < 2:
            raise CheckpointError(f"{source}: --all_domains needs a multi-domain run")
        return [export_one(checkpoint_for(source, d), d, os.path.join(out, d), vocab_file,
                           lowercase, max_length, onnx, quantize) for d in domains]
    return [export_one(checkpoint_for(source, domain), domain, out, vocab_file, lowercase,
                       max_length, onnx, quantize)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("source", help="a run directory or a checkpoint file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--domain", help="the domain whose head (and best checkpoint) to export")
    parser.add_argument("--all_domains", action="store_true",
                        help="export every domain of a multi-domain run into --out/<domain>")
    parser.add_argument("--vocab_file", help="default: the run directory's vocab.txt")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (checked against PyTorch's logits)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write model.int8.onnx (ONNX Runtime's dynamic "
                             "quantization; implies --onnx)")
    args = parser.parse_args(argv)

    def run():
        for folder in export(args.source, args.out, args.domain, args.all_domains,
                             args.vocab_file, args.onnx, args.quantize):
            print(folder)

    return utils.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
