"""Benchmarks: a training step of each stage, the straightforward HRKD step, and inference.

Times, for a teacher and a student config, sequence length T and per-domain batch B:
  (a) one optimisation step of each of the four stages, using the stages' own loss functions
      (examples per second: median over --steps steps after --warmup; peak memory), plus the
      straightforward HRKD step (one teacher forward and one student forward per domain, full
      attention scores in every layer, teachers under plain no_grad), so the gain is measured in
      the same run;
  (b) inference throughput of the teacher and the student on the same inputs (--infer_batch),
      and their ratio.
Weights are random (speed does not depend on them). Writes JSON to stdout or --out.

    python bench.py --preset tiny                    # demo sizes, seconds
    python bench.py --preset paper --device cpu      # BERT-base x 5 domains -> TinyBERT 4L-312
    python bench.py --preset real                    # MiniLM x 4 domains -> 2 layers, width 384
    python bench.py --preset paper --device cuda --amp bf16 --compile
Each training case also reports GFLOP per step (torch.utils.flop_counter), achieved GFLOP/s and
its fraction of this machine's dense matmul rate measured in the same run (before and after
the training cases; the higher counts), and the spread of its step times (interquartile range /
median). The HRKD step and the straightforward one are timed in alternating rounds, and their
ratio is the median of the per-round ratios, so a change in the machine's load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import objectives
import teacher_cache
from objectives import (DistillConfig, cross_entropy_loss, make_hrkd_loss, make_kd_loss,
                        make_multi_domain_ce)
from weighting import GraphWeighting
import runtime
import stages
import training
import utils
from distillation import DomainRelationalGraph, domain_prototypes, hrkd_loss
from modeling import BertClassifier, resolve_config
from teacher_cache import TeacherTargets

PRESETS = {
    "tiny": dict(teacher="tiny_teacher", student="tiny_student", seq_len=40, batch=16, domains=4,
                 vocab=250),
    "paper": dict(teacher="bert_base", student="tinybert_4l_312", seq_len=128, batch=8, domains=5,
                  vocab=30522),
    # The real-data configuration: all-MiniLM-L6-v2 teachers, 2-layer students of width 384.
    "real": dict(teacher="minilm_6l_384", student="minilm_2l_384", seq_len=128, batch=8,
                 domains=4, vocab=30522),
}


def random_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator):
    """Token ids with realistic padding: lengths uniform in [T/4, T]."""
    lengths = torch.randint(seq_len // 4, seq_len + 1, (batch,), generator=generator)
    positions = torch.arange(seq_len)[None]
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = torch.randint(5, vocab, (batch, seq_len), generator=generator) * attention_mask
    return {"input_ids": input_ids, "segment_ids": torch.zeros_like(input_ids),
            "attention_mask": attention_mask,
            "labels": torch.randint(0, 3, (batch,), generator=generator)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    # CPU: the process's peak resident set so far (an upper bound for the case just run).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, steps: int, warmup: int, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    durations = [timed_call(step, device) for _ in range(warmup + steps)][warmup:]
    return summarise(durations, device)


def timed_call(step, device) -> float:
    """Seconds of one call of ``step``, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def iqr_pct(values) -> float:
    """Interquartile range over the median, in percent: how far repeated measurements disagree."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return 100 * (quartiles[2] - quartiles[0]) / statistics.median(values)


def summarise(durations, device) -> dict:
    return {"median_s": statistics.median(durations), "steps": len(durations),
            "spread_pct": iqr_pct(durations), "peak_memory_mb": peak_memory_mb(device)}


def time_paired(steps, rounds: int, warmup: int, device):
    """Two steps timed in alternation (A B, then B A, ...), so that a change in the machine's
    load (other jobs on a shared machine) hits both alike. Returns each step's timing (as
    ``time_steps``) and the per-round speed-up of the second over the first (time of A / time
    of B): its median, interquartile spread and the medians over the first and the second half
    of the rounds, whose agreement shows how far a repeated run would move."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    durations = ([], [])
    for index in range(warmup + rounds):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            seconds = timed_call(steps[which], device)
            if index >= warmup:
                durations[which].append(seconds)
    timings = [summarise(times, device) for times in durations]
    speedups = [a / b for a, b in zip(*durations)]
    half = len(speedups) // 2
    ratio = {"rounds": len(speedups), "median": statistics.median(speedups),
             "spread_pct": iqr_pct(speedups),
             "first_half": statistics.median(speedups[:half] or speedups),
             "second_half": statistics.median(speedups[half:])}
    return timings, ratio


def step_flops(step) -> int:
    """Floating-point operations of one call of ``step`` (matrix products and attention, forward
    and backward, as torch.utils.flop_counter counts them; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def matmul_rate(device, amp: str, size: int = 2048, repeats: int = 10) -> float:
    """This machine's dense matrix-multiply rate (GFLOP/s) in the run's precision: the
    arithmetic limit the training steps are compared with."""
    dtype = runtime.AMP_DTYPES.get(amp, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = time_steps(lambda: a @ b, repeats, 2, device)
    return 2 * size ** 3 / timing["median_s"] / 1e9


def training_step(model, extra, compute_loss, batches, device, amp):
    """One optimisation step as the loop runs it (AMP, clipping, AdamW)."""
    modules = {"model": model, **extra}
    optimizer = training.build_optimizer(modules, 1e-5, 0.01, fused=amp != "off")  # as the loop
    scaler = runtime.make_scaler(device, amp)
    parameters = [p for m in modules.values() for p in m.parameters() if p.requires_grad]

    def step():
        with runtime.autocast(device, amp):
            loss = compute_loss(model, batches)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def straightforward_hrkd_loss(teachers, graph, args):
    """The HRKD step written the obvious way: per-domain forwards, every layer's scores."""

    def compute_loss(student, batches):
        teacher_outs, student_outs = [], []
        for d, (teacher, b) in enumerate(zip(teachers, batches)):
            inputs = (b["input_ids"], b["segment_ids"], b["attention_mask"])
            with torch.no_grad():
                teacher_outs.append(teacher(*inputs, domain=d))
            student_outs.append(student(*inputs, domain=d))
        weights, _ = graph(domain_prototypes([o.hidden_states for o in student_outs]))
        return hrkd_loss(student_outs, teacher_outs, weights, args.hidden_ratio,
                         args.pred_ratio, args.temperature)

    return compute_loss


def run_benchmarks(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher_config = resolve_config(args.teacher, args.vocab)
    student_config = resolve_config(args.student, args.vocab)
    batches = [runtime.to_device(random_batch(args.batch, args.seq_len, args.vocab, generator),
                               device) for _ in range(args.domains)]
    results = {"config": vars(args), "torch": torch.__version__, "machine": platform.machine(),
               "processor": platform.processor(), "threads": torch.get_num_threads(),
               "device_name": (torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               "train_step": {}, "inference": {}}

    results["matmul_gflop_per_s"] = matmul_rate(device, args.amp)
    print(f"matmul rate (the arithmetic limit): {results['matmul_gflop_per_s']:.0f} GFLOP/s",
          file=sys.stderr)

    def describe(name, timing, flops, examples):
        timing["examples_per_s"] = examples / timing["median_s"]
        timing["gflop_per_step"] = flops / 1e9
        timing["gflop_per_s"] = flops / 1e9 / timing["median_s"]
        timing["fraction_of_matmul_rate"] = timing["gflop_per_s"] / results["matmul_gflop_per_s"]
        results["train_step"][name] = timing
        print(f"{name:28s} {timing['median_s'] * 1000:9.1f} ms/step (spread "
              f"{timing['spread_pct']:4.1f}%) {timing['examples_per_s']:9.1f} ex/s "
              f"{timing['gflop_per_s']:7.1f} GFLOP/s "
              f"({100 * timing['fraction_of_matmul_rate']:.0f}% "
              f"of the first matmul rate) peak {timing['peak_memory_mb']:6.0f} MB", file=sys.stderr)

    def record(name, step, examples):
        flops = step_flops(step)  # also a warm-up call
        describe(name, time_steps(step, args.steps, args.warmup, device), flops, examples)

    def record_pair(names, steps, examples):
        flops = [step_flops(step) for step in steps]
        timings, ratio = time_paired(steps, args.pairs, args.warmup, device)
        for name, timing, count in zip(names, timings, flops):
            describe(name, timing, count, examples)
        return ratio

    cases = args.cases.split(",")
    if "train" in cases or "hrkd" in cases:
        train_benchmarks(args, device, teacher_config, student_config, batches, record,
                         record_pair, results, stages_1_to_3="train" in cases)
        # Measured again at the end: on a shared machine one measurement can catch a slow
        # moment; the limit is the higher of the two, and every fraction is taken against it.
        at_end = matmul_rate(device, args.amp)
        results["matmul_gflop_per_s_start_end"] = [results["matmul_gflop_per_s"], at_end]
        results["matmul_gflop_per_s"] = max(results["matmul_gflop_per_s"], at_end)
        for timing in results["train_step"].values():
            timing["fraction_of_matmul_rate"] = (timing["gflop_per_s"]
                                                 / results["matmul_gflop_per_s"])
        print(f"matmul rate at the end: {at_end:.0f} GFLOP/s; fractions against "
              f"{results['matmul_gflop_per_s']:.0f}: " + ", ".join(
                  f"{name} {100 * timing['fraction_of_matmul_rate']:.0f}%"
                  for name, timing in results["train_step"].items()), file=sys.stderr)
    if "buckets" in cases:
        buckets_benchmarks(args, device, teacher_config, student_config, results)
    if "metakd" in cases:
        metakd_benchmarks(args, device, teacher_config, student_config, batches, record_pair,
                          results)
    if "peer" in cases:
        peer_benchmarks(args, device, teacher_config, student_config, batches, record_pair,
                        results)
    if "deploy" in cases:
        import deploy_bench
        deploy_bench.deploy_benchmarks(args, results)
    if "scheduler" in cases:
        import scheduler_bench
        scheduler_bench.scheduler_benchmarks(args, results)
    if "inference" in cases:
        inference_benchmarks(args, device, teacher_config, student_config, generator, results)
    return results


def cached_targets(teachers, groups, batches, student_layers, amp, device, folder):
    """The teacher targets of the benchmark's batches, stored and memory-mapped as a run stores
    them (teacher_cache.py), and the batches carrying their example indices: a cached step
    then reads its targets from disk (page cache) as in training."""
    per_domain = [None] * len(batches)
    for teacher, domains in zip(teachers, groups):
        for domain in domains:
            head = domain if teacher.num_domains is not None else None
            inputs = {k: v.cpu() for k, v in batches[domain].items()}
            per_domain[domain] = teacher_cache.domain_targets(
                folder, teacher, head, inputs, student_layers, amp,
                inputs["input_ids"].shape[0] * len(domains), device)
    indexed = [{**b, "example_index": torch.arange(b["input_ids"].shape[0], device=device)}
               for b in batches]
    return TeacherTargets(per_domain), indexed


def stage_1_to_3_benchmarks(args, device, teacher_config, student_config, batches, record,
                            loss_args, cache_dir):
    width, domains = teacher_config.hidden_size, args.domains
    # Stage 1: one teacher, cross-entropy.
    teacher = BertClassifier(teacher_config, 3).to(device)
    record("stage1_teacher_ce", training_step(teacher, {}, cross_entropy_loss, batches[:1],
                                              device, args.amp), args.batch)
    del teacher
    # Stage 2: TinyBERT-KD on one domain.
    frozen = objectives.freeze(BertClassifier(teacher_config, 3).to(device), args.amp)
    student = BertClassifier(student_config, 3, fit_size=width).to(device)
    record("stage2_tinybert_kd", training_step(student, {}, make_kd_loss(frozen, loss_args),
                                               batches[:1], device, args.amp), args.batch)
    targets, indexed = cached_targets([frozen], [[0]], batches[:1],
                                      student_config.num_hidden_layers, args.amp, device,
                                      cache_dir)
    record("stage2_tinybert_kd_cached",
           training_step(student, {}, make_kd_loss(frozen, loss_args, targets), indexed,
                         device, args.amp), args.batch)
    del frozen, student
    # Stage 3: multi-domain teacher, one forward over all domains.
    multi_teacher = BertClassifier(teacher_config, 3, num_domains=domains).to(device)
    record("stage3_multi_domain_ce", training_step(multi_teacher, {}, make_multi_domain_ce(None),
                                                   batches, device, args.amp),
           args.batch * domains)
    del multi_teacher


def train_benchmarks(args, device, teacher_config, student_config, batches, record, record_pair,
                     results, stages_1_to_3=True):
    width, domains = teacher_config.hidden_size, args.domains
    loss_args = DistillConfig(hidden_ratio=1.0, pred_ratio=1.0, temperature=1.0)
    cache = tempfile.TemporaryDirectory(prefix="bench-teacher-cache-")
    if stages_1_to_3:
        stage_1_to_3_benchmarks(args, device, teacher_config, student_config, batches, record,
                                loss_args, cache.name)
    # Stage 4: HRKD, optimised and straightforward, same models and inputs.
    teachers = [objectives.freeze(BertClassifier(teacher_config, 3, num_domains=domains).to(device),
                             args.amp) for _ in range(domains)]
    student = BertClassifier(student_config, 3, num_domains=domains, fit_size=width).to(device)
    graph = DomainRelationalGraph(student_config.num_hidden_layers + 1, domains, width).to(device)
    graph.requires_grad_(False)
    hrkd_step = training_step(student, {"graph": graph},
                              make_hrkd_loss(teachers, [[d] for d in range(domains)],
                                             GraphWeighting(graph, False), loss_args),
                              batches, device, args.amp)
    if args.compile:
        record("stage4_hrkd_compiled",
               training_step(student, {"graph": graph}, stages.compiled(
                   make_hrkd_loss(teachers, [[d] for d in range(domains)],
                                  GraphWeighting(graph, False), loss_args),
                   args.compile_backend, args.compile_mode), batches, device, args.amp),
               args.batch * domains)
    plain_teachers = teachers
    if args.straightforward_amp != args.amp:  # plain teachers, as the straightforward code has
        plain_teachers = [objectives.freeze(BertClassifier(teacher_config, 3, num_domains=domains)
                                       .to(device)) for _ in range(domains)]
    straightforward_step = training_step(
        student, {"graph": graph}, straightforward_hrkd_loss(plain_teachers, graph, loss_args),
        batches, device, args.straightforward_amp)
    # Timed in alternation: the ratio of the two is what must hold from run to run.
    results["hrkd_vs_straightforward_rounds"] = record_pair(
        ("stage4_hrkd_straightforward", "stage4_hrkd"), (straightforward_step, hrkd_step),
        args.batch * domains)
    # The step that reads the teachers' targets (teacher_cache), against the straightforward
    # one in alternating rounds as well.
    groups = [[d] for d in range(domains)]
    targets, indexed = cached_targets(teachers, groups, batches,
                                      student_config.num_hidden_layers, args.amp, device,
                                      cache.name)
    cached_step = training_step(student, {"graph": graph},
                                make_hrkd_loss(teachers, groups, GraphWeighting(graph, False),
                                               loss_args, targets=targets),
                                indexed, device, args.amp)
    results["hrkd_cached_vs_straightforward_rounds"] = record_pair(
        ("stage4_hrkd_straightforward_again", "stage4_hrkd_cached"),
        (straightforward_step, cached_step), args.batch * domains)
    cache.cleanup()
    # Profiled last: the profiler's hooks must not slow any timed step.
    if args.profile:
        results["hrkd_profile"] = profile_step(hrkd_step, device)
    steps, rounds = results["train_step"], results["hrkd_vs_straightforward_rounds"]
    results["hrkd_speedup_vs_straightforward"] = rounds["median"]
    print(f"HRKD step vs straightforward: {rounds['median']:.3f}x (median of {rounds['rounds']} "
          f"alternating rounds; interquartile range {rounds['spread_pct']:.1f}%; halves "
          f"{rounds['first_half']:.3f}x / {rounds['second_half']:.3f}x)", file=sys.stderr)
    cached = results["hrkd_cached_vs_straightforward_rounds"]
    results["hrkd_cached_speedup_vs_straightforward"] = cached["median"]
    print(f"HRKD step with cached teacher targets vs straightforward: {cached['median']:.3f}x "
          f"(median of {cached['rounds']} rounds; interquartile range "
          f"{cached['spread_pct']:.1f}%)", file=sys.stderr)
    if "stage4_hrkd_compiled" in steps:
        results["compiled_hrkd_speedup_vs_straightforward"] = (
            steps["stage4_hrkd_compiled"]["examples_per_s"]
            / steps["stage4_hrkd_straightforward"]["examples_per_s"])
        print(f"compiled HRKD step vs straightforward: "
              f"{results['compiled_hrkd_speedup_vs_straightforward']:.2f}x", file=sys.stderr)


def mnli_features(mnli_dir: str, seq_len: int, per_genre: int):
    """The first ``per_genre`` training pairs of every MNLI genre, tokenized with the
    bert-base-uncased vocabulary (MiniLM's) at ``seq_len``, as the stages store them."""
    import data_processing
    from modeling import checkpoint_path
    from tokenization import WordPieceTokenizer
    tokenizer = WordPieceTokenizer(os.path.join(checkpoint_path("all-MiniLM-L6-v2"),
                                                "vocab.txt"))
    processor = data_processing.MnliProcessor()
    return [data_processing.examples_to_tensors(
        processor.read_splits(mnli_dir, genre)["train"][:per_genre], tokenizer, seq_len)
        for genre in processor.domains]


def buckets_benchmarks(args, device, teacher_config, student_config, results):
    """Stages 2 and 4 on real MNLI pairs at --seq_len: a step of batches padded to --seq_len
    (the default) against a step of --length_buckets batches (similar lengths, padded to the
    step's longest input), the next batch of each sampler every round, in alternating rounds;
    the ratio is the time of the padded steps over the bucketed ones. The teachers run live
    (with the teacher cache the student's share is larger; it scales the same way)."""
    import data_processing
    features = mnli_features(args.mnli_dir, args.seq_len, args.bucket_examples)
    sizes = [f["labels"].shape[0] for f in features]
    lengths = [f["attention_mask"].sum(dim=1).numpy() for f in features]
    width, loss_args = teacher_config.hidden_size, DistillConfig()
    teacher = objectives.freeze(BertClassifier(teacher_config, 3).to(device), args.amp)
    student = BertClassifier(student_config, 3, fit_size=width).to(device)
    teachers = [objectives.freeze(BertClassifier(teacher_config, 3, num_domains=len(sizes))
                                  .to(device), args.amp)]
    multi = BertClassifier(student_config, 3, num_domains=len(sizes), fit_size=width).to(device)
    graph = DomainRelationalGraph(student_config.num_hidden_layers + 1, len(sizes),
                                  width).to(device).requires_grad_(False)
    cases = {
        "stage2": ([3], student, {}, make_kd_loss(teacher, loss_args)),
        "stage4_hrkd": (list(range(len(sizes))), multi, {"graph": graph},
                        make_hrkd_loss(teachers, [list(range(len(sizes)))],
                                       GraphWeighting(graph, False), loss_args)),
    }
    summary = {}
    for name, (domains, model, extra, loss) in cases.items():
        samplers = [data_processing.MultiDomainBatchSampler(
            [sizes[d] for d in domains], args.batch, 0, 42,
            lengths=[lengths[d] for d in domains] if bucketed else None)
            for bucketed in (False, True)]
        streams = [iter(sampler.epoch(0)) for sampler in samplers]

        def step_of(which):
            def step():
                indices = next(streams[which])
                batches = [data_processing.take(features[d], idx)
                           for d, idx in zip(domains, indices)]
                if which:
                    batches = data_processing.trim_to_longest(batches)
                training_step(model, extra, loss, [runtime.to_device(b, device)
                                                   for b in batches], device, args.amp)()
            return step
        timings, ratio = time_paired([step_of(0), step_of(1)], args.pairs, args.warmup, device)
        padded_steps = len(domains) * args.batch / timings[0]["median_s"]
        summary[name] = {"padded": timings[0], "bucketed": timings[1], "speedup": ratio}
        print(f"{name}: padded to {args.seq_len} {timings[0]['median_s'] * 1000:.0f} ms/step, "
              f"length buckets {timings[1]['median_s'] * 1000:.0f} ms/step: "
              f"{ratio['median']:.2f}x (median of {ratio['rounds']} alternating rounds; "
              f"halves {ratio['first_half']:.2f}x / {ratio['second_half']:.2f}x; "
              f"{padded_steps:.1f} padded examples/s)", file=sys.stderr)
    mean_length = float(np.mean(np.concatenate(lengths)))
    results["length_buckets"] = {"mean_input_length": mean_length, **summary}


def metakd_benchmarks(args, device, teacher_config, student_config, batches, record_pair,
                      results):
    """Meta-KD's stage B against the TinyBERT-KD student it is compared with, both reading
    cached teacher targets as the runs do: the B1 step (intermediate layers, weighted) and the
    B2 step (logits only), each timed in alternating rounds with the stage-2 step. Stage B's
    cost relative to a stage-2 run of --metakd_epochs[2] epochs follows from the two ratios
    and the epochs of B1 and B2 (--metakd_epochs)."""
    import metakd
    width = teacher_config.hidden_size
    domains = args.domains
    teacher = objectives.freeze(BertClassifier(teacher_config, 3).to(device), args.amp)
    teacher_branch = objectives.freeze(metakd.DomainBranch(width, domains)).to(device)
    student = BertClassifier(student_config, 3, fit_size=width).to(device)
    student_branch = metakd.DomainBranch(student_config.hidden_size, domains).to(device)
    cache = tempfile.TemporaryDirectory(prefix="bench-metakd-cache-")
    targets, indexed = cached_targets([teacher], [[0]], batches[:1],
                                      student_config.num_hidden_layers, args.amp, device,
                                      cache.name)
    weights = torch.rand(args.batch, generator=torch.Generator().manual_seed(0))
    config = metakd.MetaKDConfig()
    stage2 = training_step(student, {}, make_kd_loss(teacher, DistillConfig(), targets),
                           indexed, device, args.amp)
    b1 = training_step(student, {"domain_branch": student_branch},
                       metakd.make_intermediate_loss(teacher, teacher_branch, student_branch,
                                                     weights, 0, config, targets),
                       indexed, device, args.amp)
    b2 = training_step(student, {}, metakd.make_prediction_loss(teacher, config, targets),
                       indexed, device, args.amp)
    first = record_pair(("metakd_b1_cached", "stage2_tinybert_kd_cached"), (b1, stage2),
                        args.batch)
    second = record_pair(("metakd_b2_cached", "stage2_tinybert_kd_cached_again"), (b2, stage2),
                         args.batch)
    cache.cleanup()
    # record_pair's ratio is time(first step) / time(second): B1 (B2) over the stage-2 step
    b1_epochs, b2_epochs, stage2_epochs = args.metakd_epochs
    relative = (b1_epochs * first["median"] + b2_epochs * second["median"]) / stage2_epochs
    results["metakd_b1_vs_stage2_rounds"] = first
    results["metakd_b2_vs_stage2_rounds"] = second
    results["metakd_stage_b_vs_stage2"] = {"b1_epochs": b1_epochs, "b2_epochs": b2_epochs,
                                           "stage2_epochs": stage2_epochs, "ratio": relative}
    print(f"Meta-KD step / TinyBERT-KD step: B1 {first['median']:.3f}x, B2 "
          f"{second['median']:.3f}x (medians of {first['rounds']} alternating rounds); stage B "
          f"of {b1_epochs:g} + {b2_epochs:g} epochs / TinyBERT-KD of {stage2_epochs:g}: "
          f"{relative:.2f}x", file=sys.stderr)


def textbrewer_step(teacher_config, student_config, batch, device, amp: str = "off"):
    """The peer a user would pick instead of stage 2: TextBrewer's GeneralDistiller on Hugging
    Face BERT models of the same sizes, with the same terms (embedding + hidden-state MSE
    through linear projections, attention MSE on every mapped block, soft cross-entropy at
    temperature 1) and its own per-batch loss (``train_on_batch``), then the step its training
    loop takes (backward, clipping at 1.0, AdamW over the student and the projections)."""
    import textbrewer
    from textbrewer import DistillationConfig as BrewerDistillation, TrainingConfig
    from transformers import BertConfig as HFBertConfig, BertForSequenceClassification
    from distillation import teacher_layer_for

    def hf_model(config):
        hf = HFBertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                          num_hidden_layers=config.num_hidden_layers,
                          num_attention_heads=config.num_attention_heads,
                          intermediate_size=config.intermediate_size,
                          max_position_embeddings=config.max_position_embeddings,
                          num_labels=3, attn_implementation="eager")
        return BertForSequenceClassification(hf).to(device)

    teacher, student = hf_model(teacher_config).eval(), hf_model(student_config).train()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    width_t, width_s = teacher_config.hidden_size, student_config.hidden_size
    mapped = teacher_layer_for(student_config.num_hidden_layers,
                               teacher_config.num_hidden_layers)
    matches = [{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse",
                "weight": 1, "proj": ["linear", width_s, width_t]}]
    for i, j in enumerate(mapped, start=1):
        matches.append({"layer_T": j, "layer_S": i, "feature": "hidden", "loss": "hidden_mse",
                        "weight": 1, "proj": ["linear", width_s, width_t]})
        matches.append({"layer_T": j - 1, "layer_S": i - 1, "feature": "attention",
                        "loss": "attention_mse", "weight": 1})

    def adaptor(batch_, outputs):
        return {"logits": outputs.logits, "hidden": outputs.hidden_states,
                "attention": outputs.attentions, "inputs_mask": batch_["attention_mask"]}

    distiller = textbrewer.GeneralDistiller(
        train_config=TrainingConfig(device=device, log_dir=None, output_dir=tempfile.mkdtemp()),
        distill_config=BrewerDistillation(temperature=1, intermediate_matches=matches,
                                          kd_loss_type="ce", kd_loss_weight=1),
        model_T=teacher, model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
    inputs = {"input_ids": batch["input_ids"], "token_type_ids": batch["segment_ids"],
              "attention_mask": batch["attention_mask"]}
    parameters = list(student.parameters()) + [p for proj in distiller.projs if proj is not None
                                               for p in proj.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01)
    arguments = {"output_hidden_states": True, "output_attentions": True}

    def step():
        with runtime.autocast(device, amp):
            loss, _ = distiller.train_on_batch(inputs, arguments)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peer_benchmarks(args, device, teacher_config, student_config, batches, record_pair,
                    results):
    """Our stage-2 step (in the run's --amp, with the teacher cache) against TextBrewer's
    GeneralDistiller step in fp32, in alternating rounds on the same inputs and sizes."""
    loss_args = DistillConfig(hidden_ratio=1.0, pred_ratio=1.0, temperature=1.0)
    frozen = objectives.freeze(BertClassifier(teacher_config, 3).to(device), args.amp)
    student = BertClassifier(student_config, 3, fit_size=teacher_config.hidden_size).to(device)
    with tempfile.TemporaryDirectory(prefix="bench-teacher-cache-") as folder:
        targets, indexed = cached_targets([frozen], [[0]], batches[:1],
                                          student_config.num_hidden_layers, args.amp, device,
                                          folder)
        ours = training_step(student, {}, make_kd_loss(frozen, loss_args, targets), indexed,
                             device, args.amp)
        ours_live = training_step(student, {}, make_kd_loss(frozen, loss_args), batches[:1],
                                  device, args.amp)
        theirs = textbrewer_step(teacher_config, student_config, batches[0], device)
        ratio = record_pair(("peer_textbrewer_fp32", "peer_ours_stage2_cached"),
                            (theirs, ours), args.batch)
        live = record_pair(("peer_textbrewer_fp32_again", "peer_ours_stage2"),
                           (theirs, ours_live), args.batch)
    steps = results["train_step"]
    results["peer"] = {"textbrewer_step_s": steps["peer_textbrewer_fp32"]["median_s"],
                       "ours_step_s": steps["peer_ours_stage2_cached"]["median_s"],
                       "ours_vs_textbrewer": ratio["median"], "rounds": ratio,
                       "ours_uncached_step_s": steps["peer_ours_stage2"]["median_s"],
                       "ours_uncached_vs_textbrewer": live["median"],
                       "ours_amp": args.amp}
    print(f"stage 2 vs TextBrewer GeneralDistiller (fp32): {ratio['median']:.3f}x with the "
          f"teacher cache, {live['median']:.3f}x without (ours in --amp {args.amp}; medians of "
          f"{ratio['rounds']} alternating rounds)", file=sys.stderr)


def profile_step(step, device, top: int = 12) -> dict:
    """Kernel launches and the most expensive operators of one (warm) step."""
    from torch.profiler import ProfilerActivity, profile
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    events = profiler.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort_key, row_limit=top)
    print(table, file=sys.stderr)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC"))
    return {"kernel_launches": launches, "operators": len(events), "table": table}


def inference_benchmarks(args, device, teacher_config, student_config, generator, results):
    """Teacher vs student on the same inputs: fused attention, inference mode, logits only."""
    width = teacher_config.hidden_size
    inputs = runtime.to_device(random_batch(args.infer_batch, args.seq_len, args.vocab, generator),
                             device)
    for name, model in (("teacher", BertClassifier(teacher_config, 3)),
                        ("student", BertClassifier(student_config, 3, fit_size=width))):
        model = model.to(device).eval()

        def infer():
            with torch.inference_mode(), runtime.autocast(device, args.amp):
                model(inputs["input_ids"], inputs["segment_ids"], inputs["attention_mask"],
                      score_layers=(), fit=False)

        timing = time_steps(infer, args.steps, args.warmup, device)
        timing["examples_per_s"] = args.infer_batch / timing["median_s"]
        results["inference"][name] = timing
        print(f"inference {name:18s} {timing['median_s'] * 1000:9.1f} ms/batch "
              f"{timing['examples_per_s']:9.1f} ex/s", file=sys.stderr)
    results["student_vs_teacher_inference"] = (results["inference"]["student"]["examples_per_s"]
                                               / results["inference"]["teacher"]["examples_per_s"])
    print(f"student vs teacher inference: {results['student_vs_teacher_inference']:.2f}x",
          file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="sizes; the flags below override them")
    parser.add_argument("--teacher", help="teacher config (preset name or config.json)")
    parser.add_argument("--student", help="student config")
    parser.add_argument("--seq_len", type=int)
    parser.add_argument("--batch", type=int, help="examples per domain per step")
    parser.add_argument("--domains", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--infer_batch", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"],
                        help="auto: bf16 where the hardware computes it natively, else fp32")
    parser.add_argument("--straightforward_amp", default="off", choices=["off", "bf16", "fp16"],
                        help="AMP of the straightforward HRKD step (default fp32, the baseline)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps of each single case (the HRKD pair: --pairs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=20,
                        help="alternating rounds of the HRKD and the straightforward step")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the HRKD step under torch.compile (stage4_hrkd_compiled)")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default=None, help="e.g. reduce-overhead (CUDA graphs)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one HRKD step (operators, kernel launches)")
    parser.add_argument("--cases", default="train,inference",
                        help="comma-separated: train (every stage's step), hrkd (only the "
                             "stage-4 pairs), peer (stage 2 against TextBrewer's "
                             "GeneralDistiller; needs requirements-dev.txt), metakd "
                             "(Meta-KD's B1 and B2 steps against the stage-2 step), buckets "
                             "(stages 2 and 4 on real MNLI pairs, padded against "
                             "--length_buckets), inference, "
                             "deploy (every deployed form at the real and paper sizes on "
                             "real reviews: deploy_bench.py; needs onnxruntime), scheduler "
                             "(a 12-run tiny plan through scheduler.py's Ray tasks against "
                             "the scheduler before Ray: scheduler_bench.py)")
    parser.add_argument("--deploy_texts", type=int, default=200,
                        help="deploy: reviews timed one by one at batch 1")
    parser.add_argument("--deploy_batches", type=int, default=3,
                        help="deploy: timed batches of --infer_batch reviews padded to --seq_len")
    parser.add_argument("--deploy_sizes", default="real,paper",
                        help="deploy: the sizes to run (real: MiniLM-6L / 2L-384; paper: "
                             "BERT-base / TinyBERT 4L-312)")
    parser.add_argument("--mnli_dir", default=os.path.join(os.path.dirname(
                            os.path.dirname(os.path.abspath(__file__))), "shared", "data",
                            "mnli_sample"),
                        help="buckets: the MNLI files (GLUE's or the sample's)")
    parser.add_argument("--bucket_examples", type=int, default=800,
                        help="buckets: training pairs of each genre tokenized for the case")
    parser.add_argument("--metakd_epochs", type=float, nargs=3, default=[5.0, 5.0, 10.0],
                        metavar=("B1", "B2", "STAGE2"),
                        help="metakd: the epochs of Meta-KD's B1 and B2 and of the TinyBERT-KD "
                             "student its cost is compared with (presets/real.sh)")
    parser.add_argument("--scheduler_baseline", default="929c4c0",
                        help="scheduler: the git commit whose scheduler.py (subprocesses of "
                             "its own, before Ray) is the baseline")
    parser.add_argument("--scheduler_rounds", type=int, default=2,
                        help="scheduler: rounds of both (ABBA order)")
    parser.add_argument("--scheduler_steps", type=int, default=20,
                        help="scheduler: optimisation steps of each tiny run")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is available", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.amp_requested = args.amp
    args.amp, reason = runtime.resolve_amp(args.amp, torch.device(args.device))
    if reason:
        print(reason, file=sys.stderr)
    results = run_benchmarks(args)
    text = json.dumps(results, indent=2)
    if args.out:
        utils.atomic_write_text(args.out, text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
