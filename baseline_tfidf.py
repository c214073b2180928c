"""The baseline a practitioner tries first: TF-IDF features + logistic regression, per domain.

Reads  --data_dir with the task's reader (the same splits as the neural stages, --train_ratio
       included, so few-shot rows compare like with like).
Writes --output_dir/<domain>/results.json in the layout of the stage runs ({"dev": ...,
       "test": {"per_domain": ...}}), so report.py shows it as a row of the same table.

The regularisation strength C is chosen on each domain's dev split (never on test) from
--c_grid; features are word 1-2-grams (sublinear tf, lower-cased), fitted on the training split;
for sentence pairs (MNLI) three blocks of them: the premise, the hypothesis, and the hypothesis's
words marked by whether the premise holds them (the lexical overlap an NLI baseline needs).
liblinear (two labels) and lbfgs (more) are deterministic, so one run needs no seeds.

    python baseline_tfidf.py --task amazon --data_dir dataset/amazon \
        --output_dir runs/tfidf/amazon
"""
import argparse
import os
import sys

import numpy as np

from data_processing import get_processor
import utils
from utils import atomic_write_json, main_guard

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--output_dir", required=True,
                        help="one sub-folder per domain is written here")
    parser.add_argument("--domains", nargs="+", default=None, help="default: every domain")
    parser.add_argument("--train_ratio", type=float, default=0.9)
    parser.add_argument("--dev_ratio", type=float, default=0.1)
    parser.add_argument("--data_seed", type=int, default=42)
    parser.add_argument("--c_grid", type=float, nargs="+", default=list(DEFAULT_C_GRID))
    return parser


def texts_of(examples):
    """A pair's two texts joined (TF-IDF has no segments); labels as an array."""
    return ([e.text_a if not e.text_b else f"{e.text_a} {e.text_b}" for e in examples],
            np.array([e.label for e in examples]))


def pair_views(examples):
    """Three documents per sentence pair (MNLI): the premise, the hypothesis, and the
    hypothesis's words each marked by whether the premise holds it ("in_x" / "out_x"): what
    a bag of words of the joined pair cannot see is which hypothesis words the premise
    supports, the lexical-overlap signal a linear NLI baseline lives on."""
    import re
    word = re.compile(r"\w+")
    premises = [e.text_a for e in examples]
    hypotheses = [e.text_b or "" for e in examples]
    overlap = []
    for premise, hypothesis in zip(premises, hypotheses):
        seen = set(word.findall(premise.lower()))
        overlap.append(" ".join(("in_" if w in seen else "out_") + w
                                for w in word.findall(hypothesis.lower())))
    return [premises, hypotheses, overlap]


class Featurizer:
    """TF-IDF word 1-2-grams (sublinear tf, lower-cased) fitted on the training split: of the
    text (a pair's two texts joined), or, for sentence pairs, of each of ``pair_views``."""

    def __init__(self, pairs: bool):
        self.pairs = pairs
        self.vectorizers = []

    def _views(self, examples):
        return pair_views(examples) if self.pairs else [texts_of(examples)[0]]

    def fit_transform(self, examples):
        from sklearn.feature_extraction.text import TfidfVectorizer
        views = self._views(examples)
        self.vectorizers = [TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                            lowercase=True) for _ in views]
        return self._stack([v.fit_transform(x) for v, x in zip(self.vectorizers, views)])

    def transform(self, examples):
        return self._stack([v.transform(x) for v, x in zip(self.vectorizers,
                                                             self._views(examples))])

    @staticmethod
    def _stack(blocks):
        from scipy.sparse import hstack
        return blocks[0] if len(blocks) == 1 else hstack(blocks).tocsr()


def fit_domain_baseline(splits, c_grid):
    """{'c', 'dev', 'test'}: the dev-best C of the grid, its dev and test accuracy."""
    from sklearn.linear_model import LogisticRegression
    train_y = texts_of(splits["train"])[1]
    if len(set(train_y.tolist())) < 2:
        raise ValueError("a training split with a single label cannot fit a classifier")
    featurizer = Featurizer(pairs=any(e.text_b for e in splits["train"]))
    train_features = featurizer.fit_transform(splits["train"])
    evaluated = {name: (featurizer.transform(splits[name]), texts_of(splits[name])[1])
                 for name in ("dev", "test")}
    best = None
    for c in c_grid:
        # liblinear (the Amazon rows') is binary only; lbfgs for three labels (MNLI); both
        # are deterministic
        solver = "liblinear" if len(set(train_y.tolist())) == 2 else "lbfgs"
        model = LogisticRegression(C=c, solver=solver, max_iter=1000)
        model.fit(train_features, train_y)
        scores = {name: float(np.mean(model.predict(x) == y)) for name, (x, y) in evaluated.items()}
        if best is None or scores["dev"] > best["dev"]:  # ties keep the smaller C
            best = {"c": c, **scores}
    return best


def run(args):
    processor = get_processor(args.task, args.data_dir)
    domains = args.domains or list(processor.domains)
    for domain in domains:
        if domain not in processor.domains:
            raise ValueError(f"unknown {args.task} domain '{domain}' "
                             f"(expected one of {', '.join(processor.domains)})")
    # Read and fit everything before writing anything.
    results = {}
    for domain in domains:
        splits = processor.read_splits(args.data_dir, domain, args.train_ratio, args.dev_ratio,
                                       args.data_seed)
        results[domain] = fit_domain_baseline(splits, args.c_grid)
        results[domain]["test_examples"] = len(splits["test"])
        print(f"{domain}: C={results[domain]['c']:g} dev {100 * results[domain]['dev']:.1f} "
              f"test {100 * results[domain]['test']:.1f} ({len(splits['train'])} train)")
    for domain, best in results.items():
        folder = os.path.join(args.output_dir, domain)
        os.makedirs(folder, exist_ok=True)
        atomic_write_json(os.path.join(folder, "results.json"), {
            "method": "tfidf_logistic_regression", "c": best["c"], "c_grid": args.c_grid,
            "train_ratio": args.train_ratio, "data_seed": args.data_seed,
            "dev": {"per_domain": {domain: best["dev"]}},
            "test": {"per_domain": {domain: best["test"]}, "mean": best["test"],
                     "examples_per_domain": {domain: best["test_examples"]}},
            "finished": {"train_steps": None, "tested": True}})


def main(argv=None) -> int:
    return main_guard(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
