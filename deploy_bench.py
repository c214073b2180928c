"""Speed and size of the deployed forms of a model (bench.py --cases deploy; deploy_eval.py).

A form is a function from padded features (numpy: input_ids, segment_ids, attention_mask) to
logits: PyTorch fp32 or bf16 (deploy.TorchBackend), Hugging Face BertForSequenceClassification
on the same weights (``hf_form``), ONNX Runtime fp32 or int8 (deploy.OnnxBackend). Measured on
real texts:
  latency at batch 1: each text alone at its own length (no padding), median and p90 over
      the texts after a warm-up;
  throughput at batch B: batches of B texts padded to T, examples per second (median batch).
Sizes are the files a deployment ships (safetensors, model.onnx, model.int8.onnx), in MiB.

    python bench.py --cases deploy --preset real      # real and paper sizes, random weights
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import deploy
import runtime
from modeling import BertClassifier, resolve_config
from tokenization import WordPieceTokenizer

Form = Callable[[Dict[str, np.ndarray]], np.ndarray]

# Sizes of the two pictures: the real-data configuration and the paper's (tiny: the tests').
SIZES = {"real": ("minilm_6l_384", "minilm_2l_384"),
         "paper": ("bert_base", "tinybert_4l_312"),
         "tiny": ("tiny_teacher", "tiny_student")}


def torch_form(model: torch.nn.Module, head: Optional[int] = None, amp: str = "off") -> Form:
    backend = deploy.TorchBackend(model, head, "cpu", amp)
    return backend.logits


def hf_form(model: BertClassifier, head: Optional[int] = None) -> Form:
    """transformers' BertForSequenceClassification holding ``model``'s weights (export.py's
    mapping), as a user who exported the model would run it."""
    import transformers
    import export
    config = transformers.BertConfig(**export.hf_config(
        model, [str(i) for i in range(model.num_labels)], True))
    hf = transformers.BertForSequenceClassification(config).eval()
    missing, unexpected = hf.load_state_dict(export.hf_state_dict(model, head), strict=False)
    if unexpected or [m for m in missing if not m.endswith("position_ids")]:
        raise RuntimeError(f"Hugging Face weights do not match: missing {missing}, "
                           f"unexpected {unexpected}")

    @torch.inference_mode()
    def logits(features):
        return hf(input_ids=torch.from_numpy(features["input_ids"]).long(),
                  token_type_ids=torch.from_numpy(features["segment_ids"]).long(),
                  attention_mask=torch.from_numpy(features["attention_mask"]).long()
                  ).logits.float().numpy()

    return logits


def onnx_forms(model: BertClassifier, folder: str, max_seq_length: int,
               threads: Optional[int] = None) -> Dict[str, Form]:
    """Export ``model`` (its single head, or head 0) to ``folder``: ONNX fp32 and int8."""
    path = os.path.join(folder, deploy.ONNX_FILE)
    head = None if model.num_domains is None else 0
    deploy.write_onnx(model, head, path, {}, max_seq_length)
    deploy.int8_from(model, path, os.path.join(folder, deploy.INT8_FILE))
    return {"onnx_fp32": deploy.OnnxBackend(path, threads).logits,
            "onnx_int8": deploy.OnnxBackend(os.path.join(folder, deploy.INT8_FILE),
                                            threads).logits}


def real_texts(count: int) -> tuple:
    """``count`` test reviews of the real Amazon data (../shared/data/amazon), spread over
    its domains, and where they came from; generated reviews where it is absent."""
    from data_processing import get_processor
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "dataset", "amazon"),
                   os.path.join(here, "..", "shared", "data", "amazon")):
        if os.path.isdir(folder):
            processor = get_processor("amazon", folder)
            per_domain = -(-count // len(processor.domains))
            texts = []
            for domain in processor.domains:
                test = processor.read_splits(folder, domain, 0.9, 0.1, 42)["test"]
                texts += [example.text_a for example in test[:per_domain]]
            return texts[:count], f"the real Amazon test reviews ({os.path.normpath(folder)})"
    import sample_corpus
    with tempfile.TemporaryDirectory() as scratch:
        sample = sample_corpus.generate_sample(scratch, "tiny", seed=1)
        processor = get_processor("amazon", sample["amazon"])
        texts = [e.text_a for d in processor.domains
                 for e in processor.read_splits(sample["amazon"], d, 0.9, 0.1, 42)["train"]]
    return (texts * (count // max(len(texts), 1) + 1))[:count], "generated reviews"


def bert_vocab() -> str:
    """The bert-base-uncased vocabulary (all-MiniLM-L6-v2's package holds it)."""
    from modeling import checkpoint_path
    return os.path.join(checkpoint_path("all-MiniLM-L6-v2"), "vocab.txt")


def encode_each(tokenizer: WordPieceTokenizer, texts: Sequence[str],
                max_seq_length: int) -> List[Dict[str, np.ndarray]]:
    """Each text alone, cut to its own length: what a batch-1 request carries."""
    features = tokenizer.encode_pairs(list(texts), None, max_seq_length)
    lengths = features["attention_mask"].sum(axis=1)
    return [{k: np.ascontiguousarray(v[i:i + 1, :lengths[i]]) for k, v in features.items()}
            for i in range(len(texts))]


def encode_batches(tokenizer: WordPieceTokenizer, texts: Sequence[str], max_seq_length: int,
                   batch: int) -> List[Dict[str, np.ndarray]]:
    features = tokenizer.encode_pairs(list(texts), None, max_seq_length)
    return [{k: v[start:start + batch] for k, v in features.items()}
            for start in range(0, len(texts) - batch + 1, batch)]


def latency(form: Form, requests: List[Dict[str, np.ndarray]], warmup: int = 5) -> dict:
    for request in requests[:warmup]:
        form(request)
    times = []
    for request in requests:
        start = time.perf_counter()
        form(request)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1000 * statistics.median(times),
            "p90_ms": 1000 * float(np.percentile(times, 90)), "requests": len(times)}


def throughput(form: Form, batches: List[Dict[str, np.ndarray]], warmup: int = 1) -> dict:
    for batch in batches[:warmup]:
        form(batch)
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        form(batch)
        times.append(time.perf_counter() - start)
    size = batches[0]["input_ids"].shape[0]
    return {"examples_per_s": size / statistics.median(times), "batch": size,
            "batches": len(times)}


def safetensors_mb(model: BertClassifier) -> float:
    """Size of the shipped weights (no fit maps) as export.py writes them."""
    import export
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file(export.hf_state_dict(model, None if model.num_domains is None else 0), path)
        return deploy.file_size_mb(path)


def measure_forms(forms: Dict[str, Form], requests, batches, log_prefix: str = "") -> dict:
    results = {}
    for name, form in forms.items():
        results[name] = {"batch1": latency(form, requests),
                         "bulk": throughput(form, batches)}
        print(f"{log_prefix}{name:22s} batch 1: {results[name]['batch1']['median_ms']:8.2f} ms "
              f"(p90 {results[name]['batch1']['p90_ms']:.2f}); batch "
              f"{results[name]['bulk']['batch']}: "
              f"{results[name]['bulk']['examples_per_s']:8.1f} ex/s", file=sys.stderr)
    return results


def size_benchmarks(size: str, texts: Sequence[str], seq_len: int, batch: int,
                    bulk_batches: int, bf16: bool, threads: Optional[int]) -> dict:
    """Teacher and student of ``size`` (random weights) in every form, on ``texts``."""
    teacher_name, student_name = SIZES[size]
    tokenizer = WordPieceTokenizer(bert_vocab())
    requests = encode_each(tokenizer, texts, seq_len)
    needed = batch * (bulk_batches + 1)  # a warm-up batch, then the timed ones
    bulk = (list(texts) * (needed // max(len(texts), 1) + 1))[:needed]
    batches = encode_batches(tokenizer, bulk, seq_len, batch)
    torch.manual_seed(0)
    teacher = BertClassifier(resolve_config(teacher_name, len(tokenizer)), 2).eval()
    student = BertClassifier(resolve_config(student_name, len(tokenizer)), 2).eval()
    forms = {"teacher_torch_fp32": torch_form(teacher)}
    if bf16:
        forms["teacher_torch_bf16"] = torch_form(teacher, amp="bf16")
    forms["student_hf_fp32"] = hf_form(student)
    forms["student_torch_fp32"] = torch_form(student)
    if bf16:
        forms["student_torch_bf16"] = torch_form(student, amp="bf16")
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as folder:
        for name, form in onnx_forms(student, folder, seq_len, threads).items():
            forms[f"student_{name}"] = form
        sizes = {"teacher_safetensors": safetensors_mb(teacher),
                 "student_safetensors": safetensors_mb(student),
                 "student_onnx_fp32": deploy.file_size_mb(os.path.join(folder,
                                                                        deploy.ONNX_FILE)),
                 "student_onnx_int8": deploy.file_size_mb(os.path.join(folder,
                                                                       deploy.INT8_FILE))}
        measured = measure_forms(forms, requests, batches, f"deploy {size} ")
    hf = measured["student_hf_fp32"]
    ratios = {name: {"batch1_speedup": hf["batch1"]["median_ms"] / m["batch1"]["median_ms"],
                     "bulk_speedup": m["bulk"]["examples_per_s"] / hf["bulk"]["examples_per_s"]}
              for name, m in measured.items()}
    teacher_fp32 = measured["teacher_torch_fp32"]["batch1"]["median_ms"]
    return {"teacher": teacher_name, "student": student_name, "forms": measured,
            "size_mb": sizes, "vs_hf_student_fp32": ratios,
            "int8_student_vs_fp32_teacher_batch1": teacher_fp32 / measured[
                "student_onnx_int8"]["batch1"]["median_ms"]}


def deploy_benchmarks(args, results: dict):
    """bench.py --cases deploy: every form at the real and the paper sizes, in one run."""
    texts, source = real_texts(args.deploy_texts)
    native = runtime.native_bf16(torch.device("cpu"))
    threads = args.threads or torch.get_num_threads()
    results["deploy"] = {"texts": source, "count": len(texts), "seq_len": args.seq_len,
                         "bulk_batch": args.infer_batch, "threads": threads,
                         "bf16": "measured" if native else
                         "skipped: this CPU has no native bf16 (it would be emulated)",
                         "sizes": {}}
    for size in args.deploy_sizes.split(","):
        if size not in SIZES:
            raise ValueError(f"--deploy_sizes: unknown size '{size}' ({', '.join(SIZES)})")
        results["deploy"]["sizes"][size] = size_benchmarks(
            size, texts, args.seq_len, args.infer_batch, args.deploy_batches, native, threads)
        ratio = results["deploy"]["sizes"][size]["vs_hf_student_fp32"]["student_onnx_int8"]
        print(f"deploy {size}: int8 student vs Hugging Face fp32 student: "
              f"{ratio['batch1_speedup']:.2f}x at batch 1, {ratio['bulk_speedup']:.2f}x in "
              f"bulk; vs the fp32 teacher at batch 1: "
              f"{results['deploy']['sizes'][size]['int8_student_vs_fp32_teacher_batch1']:.1f}x",
              file=sys.stderr)
