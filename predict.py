"""Labels and probabilities for texts, from a run directory or an exported folder.

Reads  the model: a run directory (its best checkpoint, or the one best on --domain), a
       checkpoint file (best_model_<domain>.bin names its domain), or a folder written by
       export.py; the texts: arguments, standard input (one example per line, a tab
       separating a pair's two texts), or --file, read by its extension: .tsv / .csv with a
       header and .jsonl as the data sets are (text or sentence / sentence1, optional
       text_pair or sentence2; a label column is ignored), .review files by their reviews,
       anything else one example per line.
Writes TSV (text, label, one probability column per label) or JSON lines to standard output
       (or --out), in input order; a progress bar on standard error for large inputs.

    python predict.py runs/finetune_domain/amazon/books/seed42 "A gripping story." "Dull."
    python predict.py hf/books --file reviews.txt --format jsonl --out predictions.jsonl
    cat pairs.tsv | python predict.py runs/finetune_multi_domain/mnli/hrkd/seed42 --domain fiction
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, List, Optional, Tuple

import torch

import training
import utils
from data_processing import plain_text_examples, read_texts
from tokenization import WordPieceTokenizer
from export import checkpoint_for, run_settings
from modeling import (BertClassifier, BertConfig, load_weights, model_from_checkpoint,
                      read_checkpoint)

PROGRESS_THRESHOLD = 1000  # examples; fewer finish before a bar would help


class Predictor:
    """A model, its tokenizer, its label names and the head to use."""

    def __init__(self, source: str, domain: Optional[str] = None,
                 max_seq_length: Optional[int] = None, device: str = "cpu"):
        self.device = torch.device(device)
        if os.path.isfile(os.path.join(source, "model.safetensors")) and \
                os.path.isfile(os.path.join(source, "config.json")):
            self._load_exported(source)
        else:
            self._load_run(source, domain)
        self.max_seq_length = min(max_seq_length or self.max_seq_length,
                                  self.model.config.max_position_embeddings)
        self.model.to(self.device).eval()

    def _load_exported(self, folder: str):
        config = utils.read_json(os.path.join(folder, "config.json"))
        id2label = config.get("id2label") or {}
        self.labels = [id2label[str(i)] for i in range(len(id2label))]
        self.model = BertClassifier(BertConfig.from_dict(config), len(self.labels))
        load_weights(self.model, folder, keep_head=True)
        self.head = None
        self.tokenizer = WordPieceTokenizer(os.path.join(folder, "vocab.txt"),
                                            lowercase=config.get("do_lower_case", True))
        tokenizer_config = utils.read_json(os.path.join(folder, "tokenizer_config.json"), {})
        self.max_seq_length = tokenizer_config.get("model_max_length", 128)

    def _load_run(self, source: str, domain: Optional[str]):
        checkpoint = checkpoint_for(source, domain)
        content = read_checkpoint(checkpoint)
        self.model = model_from_checkpoint(checkpoint)
        self.labels = content.get("labels") or [str(i) for i in range(self.model.num_labels)]
        domains = content.get("domains") or []
        self.head = None
        if self.model.num_domains is not None:
            domain = domain or utils.domain_of_checkpoint(checkpoint, domains)
            if domain is None:
                raise ValueError(f"{checkpoint}: a multi-domain model; pass --domain, one of "
                                 f"{', '.join(domains)}")
            if domain not in domains:
                raise ValueError(f"--domain {domain}: not a domain of {checkpoint} (one of "
                                 f"{', '.join(domains)})")
            self.head = domains.index(domain)
        settings = run_settings(source)
        folder = source if os.path.isdir(source) else os.path.dirname(source)
        self.tokenizer = WordPieceTokenizer(os.path.join(folder, "vocab.txt"),
                                            lowercase=settings.get("lowercase", True))
        self.max_seq_length = settings.get("max_seq_length", 128)

    def predict(self, examples: List[Tuple[str, Optional[str]]], batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
        """Probabilities (N, labels), batched, in input order."""
        from tqdm import tqdm
        chunks = []
        bar = tqdm(total=len(examples), disable=not progress, desc="predict", unit="ex",
                   file=sys.stderr)
        for start in range(0, len(examples), batch_size):
            part = examples[start:start + batch_size]
            features = self.tokenizer.encode_pairs([a for a, _ in part], [b for _, b in part],
                                                   self.max_seq_length)
            tensors = {k: torch.from_numpy(v).long() for k, v in features.items()}
            logits = training.predict_logits(self.model, tensors, self.head, batch_size, self.device)
            chunks.append(torch.softmax(logits, dim=-1))
            bar.update(len(part))
        bar.close()
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.labels))


def read_examples(lines: Iterable[str]) -> List[Tuple[str, Optional[str]]]:
    """Arguments or standard input: one example a line, a tab separating a pair's texts."""
    return plain_text_examples(lines)


def format_rows(examples, probabilities, labels, fmt: str) -> List[str]:
    rows = []
    if fmt == "tsv":
        rows.append("\t".join(["text", "text_b", "label"] + [f"p_{l}" for l in labels]))
    for (first, second), probs in zip(examples, probabilities.tolist()):
        label = labels[max(range(len(probs)), key=probs.__getitem__)]
        if fmt == "jsonl":
            record = {"text": first, "label": label,
                      "probabilities": dict(zip(labels, probs))}
            if second is not None:
                record["text_b"] = second
            rows.append(json.dumps(record, ensure_ascii=False))
        else:
            clean = [t.replace("\t", " ") for t in (first, second or "")]
            rows.append("\t".join(clean + [label] + [f"{p:.6f}" for p in probs]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("model", help="run directory, checkpoint file, or exported folder")
    parser.add_argument("texts", nargs="*", help="texts to classify (a tab separates a pair)")
    parser.add_argument("--file", help="input file, read by its extension (.tsv/.csv with a "
                        "header, .jsonl, .review, else one example per line); '-' or none: "
                        "standard input")
    parser.add_argument("--domain", help="the domain head of a multi-domain model (default: "
                        "the domain a best_model_<domain>.bin was chosen on)")
    parser.add_argument("--format", choices=["tsv", "jsonl"], default="tsv",
                        help="output format")
    parser.add_argument("--out", help="write here instead of standard output")
    parser.add_argument("--batch_size", type=int, default=64, help="examples per forward")
    parser.add_argument("--max_seq_length", type=int, help="default: the run's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda")
    args = parser.parse_intermixed_args(argv)  # texts may follow the options

    def run():
        if args.batch_size <= 0:
            raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
        if args.texts:
            examples = read_examples(args.texts)
        elif args.file and args.file != "-":
            if not os.path.isfile(args.file):
                raise FileNotFoundError(f"{args.file}: input file not found")
            examples = read_texts(args.file)
        else:
            examples = read_examples(sys.stdin)
        predictor = Predictor(args.model, args.domain, args.max_seq_length, args.device)
        probabilities = predictor.predict(examples, args.batch_size,
                                          progress=len(examples) >= PROGRESS_THRESHOLD)
        text = "\n".join(format_rows(examples, probabilities, predictor.labels, args.format))
        if args.out:
            utils.atomic_write_text(args.out, text + "\n")
        else:
            sys.stdout.write(text + "\n")

    return utils.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
