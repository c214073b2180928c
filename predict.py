"""Labels and probabilities for texts, from a run directory or an exported folder.

Reads  the model: a run directory (its best checkpoint, or the one best on --domain), a
       checkpoint file (best_model_<domain>.bin names its domain), or a folder written by
       export.py; the texts: arguments, standard input (one example per line, a tab
       separating a pair's two texts), or --file, read by its extension: .tsv / .csv with a
       header and .jsonl as the data sets are (text or sentence / sentence1, optional
       text_pair or sentence2; a label column is ignored), .review files by their reviews,
       anything else one example per line.
Writes TSV (text, label, one probability column per label) or JSON lines to standard output
       (or --out), in input order, one row per input row (a blank input line gives an empty
       row; a byte that is not UTF-8 is an error naming its line); a progress bar on standard
       error for large inputs.

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

import utils
from data_processing import plain_text_examples, read_texts
from tokenization import WordPieceTokenizer
from export import checkpoint_for, run_settings
from modeling import exported_model, model_from_checkpoint, read_checkpoint

PROGRESS_THRESHOLD = 1000  # examples; fewer finish before a bar would help


class Predictor:
    """A model, its tokenizer, its label names and the head to use, served by PyTorch or, for
    an exported folder holding model.onnx / model.int8.onnx, by ONNX Runtime (deploy.py).
    Examples are batched by length: each batch is padded to its own longest example."""

    def __init__(self, source: str, domain: Optional[str] = None,
                 max_seq_length: Optional[int] = None, device: str = "cpu",
                 backend: str = "auto", int8: bool = False):
        import deploy
        self.device = torch.device(device)
        exported = os.path.isfile(os.path.join(source, "config.json")) and (
            os.path.isfile(os.path.join(source, "model.safetensors")) or deploy.has_onnx(source))
        self.backend_name = self._choose_backend(source, backend, int8, exported)
        if self.backend_name == "onnx":
            self._load_onnx(source, domain, int8)
        elif exported:
            self._load_exported(source)
        else:
            self._load_run(source, domain)
        self.max_seq_length = max_seq_length or self.max_seq_length
        if self.backend_name == "torch":
            self.model.to(self.device).eval()
            self.max_seq_length = min(self.max_seq_length,
                                      self.model.config.max_position_embeddings)
            self.backend = deploy.TorchBackend(self.model, self.head, device)

    @staticmethod
    def _choose_backend(source: str, backend: str, int8: bool, exported: bool) -> str:
        """torch, or onnx: asked for, or (auto) where the exported folder holds the ONNX file
        wanted and onnxruntime is installed."""
        import deploy
        if int8 and backend == "torch":
            raise ValueError("--int8 runs the quantized ONNX model: use --backend onnx or auto")
        if backend == "torch":
            return "torch"
        wanted = deploy.onnx_file_of(source, int8)
        if backend == "onnx" or int8:
            if not exported or not os.path.isfile(wanted):
                raise FileNotFoundError(f"{wanted}: no such ONNX model (export.py --onnx, or "
                                        f"--quantize int8 for model.int8.onnx)")
            deploy.require("onnxruntime")
            return "onnx"
        if exported and os.path.isfile(wanted):
            try:
                deploy.require("onnxruntime")
                return "onnx"
            except deploy.MissingExtra:
                if not os.path.isfile(os.path.join(source, "model.safetensors")):
                    raise
        return "torch"

    def _load_onnx(self, folder: str, domain: Optional[str], int8: bool):
        import deploy
        self.backend = deploy.OnnxBackend(deploy.onnx_file_of(folder, int8))
        metadata = dict(self.backend.session.get_modelmeta().custom_metadata_map)
        self.labels = deploy.labels_of(metadata)
        if not self.labels:
            raise ValueError(f"{self.backend.path}: no label names in its metadata (export it "
                             f"with export.py --onnx)")
        own = metadata.get("domain") or None
        if domain and own and domain != own:
            raise ValueError(f"--domain {domain}: {self.backend.path} holds the head of "
                             f"{own}; export that domain's head (export.py --domain)")
        self.head = None
        self.tokenizer = WordPieceTokenizer(os.path.join(folder, "vocab.txt"),
                                            lowercase=metadata.get("do_lower_case") != "false")
        self.max_seq_length = int(metadata.get("max_seq_length", 128))

    def _load_exported(self, folder: str):
        config = utils.read_json(os.path.join(folder, "config.json"))
        self.model, self.labels = exported_model(folder)
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

    # Tokenized a chunk at a time: memory stays bounded on large inputs.
    CHUNK = 4096

    def predict(self, examples: List[Tuple[str, Optional[str]]], batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
        """Probabilities (N, labels), batched by length, in input order."""
        import deploy
        from tqdm import tqdm
        chunks = []
        bar = tqdm(total=len(examples), disable=not progress, desc="predict", unit="ex",
                   file=sys.stderr)
        for start in range(0, len(examples), self.CHUNK):
            part = examples[start:start + self.CHUNK]
            features = self.tokenizer.encode_pairs([a for a, _ in part], [b for _, b in part],
                                                   self.max_seq_length)
            logits = deploy.predict_features(self.backend, features, batch_size, bar.update)
            chunks.append(torch.softmax(torch.from_numpy(logits).float(), dim=-1))
        bar.close()
        return torch.cat(chunks) if chunks else torch.zeros(0, len(self.labels))


def read_examples(lines: Iterable[str]) -> List[Optional[Tuple[str, Optional[str]]]]:
    """Arguments or standard input: one example a line, a tab separating a pair's texts (a
    blank line: None, an empty output row)."""
    return plain_text_examples(lines)


def read_stdin() -> List[Optional[Tuple[str, Optional[str]]]]:
    """Standard input, strictly UTF-8: a bad byte is named with its line, as in a file."""
    if not hasattr(sys.stdin, "buffer"):  # already text (a caller's own stream)
        return read_examples(sys.stdin.read().splitlines())
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"standard input:{line}: byte 0x{data[err.start]:02x} is not UTF-8 "
                         f"(convert the input to UTF-8)") from None
    return read_examples(text.splitlines())


def predict_rows(predictor, examples, batch_size: int) -> List[Optional[List[float]]]:
    """Probabilities of every example, None for the blank ones (not run through the model)."""
    present = [e for e in examples if e is not None]
    probabilities = iter(predictor.predict(present, batch_size,
                                           progress=len(present) >= PROGRESS_THRESHOLD).tolist())
    return [None if e is None else next(probabilities) for e in examples]


def format_rows(examples, probabilities, labels, fmt: str) -> List[str]:
    rows = []
    if fmt == "tsv":
        rows.append("\t".join(["text", "text_b", "label"] + [f"p_{l}" for l in labels]))
    for example, probs in zip(examples, probabilities):
        if example is None:  # a blank input line: an empty row keeps the rows aligned
            rows.append(json.dumps({"text": "", "label": None, "probabilities": None})
                        if fmt == "jsonl" else "\t" * (2 + len(labels)))
            continue
        first, second = example
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
                        help="cpu or cuda (the torch backend)")
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                        help="auto: ONNX Runtime for an exported folder holding model.onnx "
                             "(export.py --onnx) when onnxruntime is installed, else PyTorch")
    parser.add_argument("--int8", action="store_true",
                        help="run the folder's model.int8.onnx (export.py --quantize int8)")
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
            examples = read_stdin()
        predictor = Predictor(args.model, args.domain, args.max_seq_length, args.device,
                              args.backend, args.int8)
        probabilities = predict_rows(predictor, examples, args.batch_size)
        text = "\n".join(format_rows(examples, probabilities, predictor.labels, args.format))
        if args.out:
            utils.atomic_write_text(args.out, text + "\n")
        else:
            sys.stdout.write(text + "\n")

    return utils.main_guard(run)


if __name__ == "__main__":
    sys.exit(main())
