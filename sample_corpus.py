"""The demo's corpus: generated text in the exact on-disk formats of MNLI (TSVs by genre) and
the Amazon reviews (.review files), a vocabulary for it, and the same reviews in the custom
format. Apart from the real readers (data_processing.py), which are what the demo and the
tests then exercise; no real run uses this module.

    python sample_corpus.py --out dataset/sample            # MNLI/, amazon/, vocab.txt
    python sample_corpus.py --out my_domains --custom tsv   # also my_domains/custom/
The labels follow lexical cues: some shared by all domains, some specific to one domain, and
some that flip polarity between domains, so that what transfers across domains is measurable.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import utils
from data_processing import AmazonProcessor, CustomProcessor, MnliProcessor
from tokenization import SPECIAL_TOKENS

SAMPLE_SIZES = {
    # name: (MNLI train rows per genre, MNLI dev_matched rows per genre, reviews per label)
    "tiny": (60, 20, 40),
    "small": (400, 60, 250),
    "full": (4000, 400, 1000),
}

_FILLER = ["i", "this", "the", "it", "was", "and", "for", "my", "a", "with", "after", "really",
           "quite", "bought", "got", "we", "our", "so", "overall", "week", "month", "again",
           "one", "its", "is", "have", "had", "to", "of", "all"]

# Cues shared by all domains, domain-specific cues, and words that flip polarity across domains.
_SHARED_CUES = {"positive": ["great", "excellent", "love", "recommend", "perfect"],
                "negative": ["terrible", "awful", "disappointed", "waste", "poor"]}
_AMAZON_STYLE = {
    "books": {"nouns": ["novel", "author", "chapter", "story", "characters", "plot"],
              "positive": ["gripping", "insightful", "unpredictable"],
              "negative": ["boring", "predictable", "long"]},
    "dvd": {"nouns": ["movie", "film", "actors", "scenes", "director", "soundtrack"],
            "positive": ["hilarious", "stunning", "unpredictable"],
            "negative": ["dull", "overacted", "long"]},
    "electronics": {"nouns": ["camera", "battery", "headphones", "charger", "screen", "cable"],
                    "positive": ["reliable", "fast", "long"],
                    "negative": ["defective", "overheats", "unpredictable"]},
    "kitchen": {"nouns": ["blender", "knife", "pan", "kettle", "toaster", "pot"],
                "positive": ["sturdy", "sharp", "long"],
                "negative": ["rusty", "flimsy", "unpredictable"]},
}
_NLI_STYLE = {
    "fiction": {"subjects": ["the girl", "the old man", "the stranger", "her brother"],
                "verbs": ["opened", "watched", "carried", "found"],
                "objects": ["door", "letter", "lamp", "horse"], "negation": "never"},
    "government": {"subjects": ["the agency", "the committee", "the senator", "the office"],
                   "verbs": ["approved", "reviewed", "funded", "reported"],
                   "objects": ["budget", "program", "rule", "proposal"], "negation": "refused to"},
    "slate": {"subjects": ["the critic", "the columnist", "the magazine", "the editor"],
              "verbs": ["praised", "mocked", "published", "questioned"],
              "objects": ["essay", "campaign", "album", "policy"], "negation": "never"},
    "telephone": {"subjects": ["my wife", "my neighbor", "our kids", "my friend"],
                  "verbs": ["liked", "fixed", "bought", "watched"],
                  "objects": ["car", "garden", "show", "house"], "negation": "did not"},
    "travel": {"subjects": ["the visitor", "the ferry", "the guide", "the tourist"],
               "verbs": ["reached", "crossed", "visited", "photographed"],
               "objects": ["island", "temple", "harbor", "market"], "negation": "did not"},
}
_NLI_ADJECTIVES = ["small", "old", "new", "famous", "quiet", "large"]
_NLI_REASONS = ["because it was late", "for the first time", "with great care",
                "despite the rain", "to everyone's surprise"]


def _review_text(rng: random.Random, domain: str, positive: bool) -> List[str]:
    """Lines of one review; polarity carried by 2-3 cues, each agreeing with the label w.p. 0.85."""
    style = _AMAZON_STYLE[domain]
    polarity = "positive" if positive else "negative"
    other = "negative" if positive else "positive"
    lines = []
    for _ in range(rng.randint(2, 3)):
        cue_polarity = polarity if rng.random() < 0.85 else other
        pool = _SHARED_CUES[cue_polarity] if rng.random() < 0.5 else style[cue_polarity]
        words = rng.sample(_FILLER, 4) + [rng.choice(style["nouns"]), rng.choice(pool)]
        rng.shuffle(words)
        lines.append(" ".join(words) + rng.choice([".", "!", "..."]))
    if rng.random() < 0.3:
        lines.append('"' + " ".join(rng.sample(_FILLER, 3)) + '," she said')
    return lines


def write_review_file(path: str, texts: List[List[str]], domain: str, rating: float):
    with open(path, "w", encoding="utf-8") as handle:
        for number, lines in enumerate(texts):
            handle.write(f"<review>\n<unique_id>\n{domain}-{rating}-{number}\n</unique_id>\n"
                         f"<asin>\nB{number:09d}\n</asin>\n<product_name>\n{domain} item "
                         f"{number}\n</product_name>\n<helpful>\n1 of 2\n</helpful>\n"
                         f"<rating>\n{rating}\n</rating>\n<title>\nreview {number}\n</title>\n"
                         f"<date>\nMarch 3, 2006\n</date>\n<reviewer>\nsomeone\n</reviewer>\n"
                         f"<review_text>\n" + "\n".join(lines) + "\n</review_text>\n</review>\n")


def _nli_pair(rng: random.Random, genre: str) -> Tuple[str, str, str]:
    style = _NLI_STYLE[genre]
    subject, verb, obj = (rng.choice(style["subjects"]), rng.choice(style["verbs"]),
                          rng.choice(style["objects"]))
    premise = f"{subject} {verb} the {rng.choice(_NLI_ADJECTIVES)} {obj} ."
    label = rng.choice(["contradiction", "entailment", "neutral"])
    negation = "not" if rng.random() < 0.5 else style["negation"]
    if label == "entailment":
        hypothesis = f"{subject} {verb} the {obj} ."
    elif label == "contradiction":
        hypothesis = f"{subject} {negation} {verb} the {obj} ."
    else:
        hypothesis = f"{subject} {verb} the {obj} {rng.choice(_NLI_REASONS)} ."
    if rng.random() < 0.1:  # label noise: the task is learnable, not trivial
        label = rng.choice(["contradiction", "entailment", "neutral"])
    if rng.random() < 0.1:  # an unbalanced quote, as GLUE rows have
        premise = '"' + premise
    return premise, hypothesis, label


def _flip_nli(rng: random.Random, label: str, probability: float) -> str:
    if rng.random() >= probability:
        return label
    return rng.choice([other for other in MnliProcessor.labels if other != label])


def _parse_of(sentence: str) -> str:
    return "( " + " ".join(sentence.split()) + " )"


def write_mnli_file(path: str, rows: List[Tuple[str, str, str, str]], test: bool):
    """GLUE MNLI columns: train has label1, dev_matched label1..label5, then gold_label."""
    label_columns = ["label1", "label2", "label3", "label4", "label5"] if test else ["label1"]
    header = (["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2"] + label_columns + ["gold_label"])
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(header) + "\n")
        for index, (genre, premise, hypothesis, label) in enumerate(rows):
            fields = [str(index), str(1000 + index), f"{1000 + index}e", genre,
                      _parse_of(premise), _parse_of(hypothesis), "(ROOT " + premise + ")",
                      "(ROOT " + hypothesis + ")", premise, hypothesis]
            fields += [label] * len(label_columns) + [label]
            handle.write("\t".join(fields) + "\n")


def sample_vocabulary() -> List[str]:
    """Every word the generator uses, punctuation, and single characters as WordPiece pieces."""
    words = set(_FILLER) | {w for cues in _SHARED_CUES.values() for w in cues}
    for style in _AMAZON_STYLE.values():
        words |= set(style["nouns"]) | set(style["positive"]) | set(style["negative"])
    for style in _NLI_STYLE.values():
        for phrase in style["subjects"] + style["verbs"] + style["objects"] + [style["negation"]]:
            words |= set(phrase.split())
    for phrase in _NLI_ADJECTIVES + _NLI_REASONS + ["not she said item review"]:
        words |= set(phrase.replace("'", " ' ").split())
    punctuation = list(".,!?'\"-()")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    return (list(SPECIAL_TOKENS) + punctuation + letters + ["##" + c for c in letters]
            + sorted(words - set(letters) - set(punctuation)))


def generate_sample(out_dir: str, size: str = "small", seed: int = 0,
                    noisy_domain: Optional[str] = None, flip_prob: float = 0.0) -> Dict[str, str]:
    """Write the synthetic corpus; returns the paths of the MNLI dir, the Amazon dir, the vocab.

    Labels follow lexical cues a small model learns in a few hundred steps: shared cues (the
    same in every domain) and domain-specific or polarity-flipping cues, so that what transfers
    across domains and what does not can be measured. ``noisy_domain`` (an Amazon domain or an
    MNLI genre) gets each label flipped with probability ``flip_prob`` (Amazon: the review goes
    to the other polarity's file; MNLI: another label, train.tsv only), so that the teacher
    trained on it is unreliable.
    """
    if size not in SAMPLE_SIZES:
        raise ValueError(f"unknown sample size '{size}' (expected one of {', '.join(SAMPLE_SIZES)})")
    known = AmazonProcessor.domains + MnliProcessor.domains
    if noisy_domain is not None and noisy_domain not in known:
        raise ValueError(f"unknown noisy domain '{noisy_domain}' (expected one of {', '.join(known)})")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {flip_prob}")
    noise = random.Random(seed + 1)  # a separate stream: the clean corpus stays the same
    n_train, n_test, n_reviews = SAMPLE_SIZES[size]
    rng = random.Random(seed)
    mnli_dir = os.path.join(out_dir, "MNLI")
    amazon_dir = os.path.join(out_dir, "amazon")
    os.makedirs(mnli_dir, exist_ok=True)
    train_rows, test_rows = [], []
    for genre in MnliProcessor.domains:
        # The fit domain is the largest, as telephone is in the real data.
        scale = 1.5 if genre == MnliProcessor.fit_domain else 1.0
        rows = [(genre, *_nli_pair(rng, genre)) for _ in range(int(n_train * scale))]
        if genre == noisy_domain:
            rows = [(g, p, h, _flip_nli(noise, label, flip_prob)) for g, p, h, label in rows]
        train_rows += rows
        test_rows += [(genre, *_nli_pair(rng, genre)) for _ in range(n_test)]
    rng.shuffle(train_rows)  # genres interleave in the real file
    write_mnli_file(os.path.join(mnli_dir, "train.tsv"), train_rows, test=False)
    write_mnli_file(os.path.join(mnli_dir, "dev_matched.tsv"), test_rows, test=True)
    for domain in AmazonProcessor.domains:
        folder = os.path.join(amazon_dir, domain)
        os.makedirs(folder, exist_ok=True)
        by_label = {True: [], False: []}
        for positive in (True, False):
            for _ in range(n_reviews):
                text = _review_text(rng, domain, positive)
                flipped = domain == noisy_domain and noise.random() < flip_prob
                by_label[positive != flipped].append(text)
        for positive, rating in ((True, 5.0), (False, 1.0)):
            name = "positive.review" if positive else "negative.review"
            write_review_file(os.path.join(folder, name), by_label[positive], domain, rating)
    vocab_path = os.path.join(out_dir, "vocab.txt")
    utils.atomic_write_text(vocab_path, "\n".join(sample_vocabulary()) + "\n")
    return {"mnli": mnli_dir, "amazon": amazon_dir, "vocab": vocab_path}


def write_custom_corpus(amazon_dir: str, out_dir: str, extension: str = "tsv",
                        domains: Optional[Sequence[str]] = None, with_dev: bool = True,
                        label_names: Optional[Sequence[str]] = None) -> str:
    """The Amazon-format corpus at ``amazon_dir`` rewritten in the custom format (one folder
    per domain; train/dev/test.<extension>; labels by name, ``label_names`` instead of
    negative/positive if given), with the same splits."""
    if extension not in CustomProcessor.EXTENSIONS:
        raise ValueError(f"unknown extension '{extension}' "
                         f"(expected one of {', '.join(CustomProcessor.EXTENSIONS)})")
    amazon = AmazonProcessor()
    for domain in domains or amazon.domains:
        folder = os.path.join(out_dir, domain)
        os.makedirs(folder, exist_ok=True)
        splits = amazon.read_splits(amazon_dir, domain)
        for split, examples in splits.items():
            if split == "dev" and not with_dev:
                continue
            rows = [(e.text_a, (label_names or amazon.labels)[e.label]) for e in examples]
            path = os.path.join(folder, f"{split}.{extension}")
            if extension == "jsonl":
                text = "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows)
            elif extension == "tsv":
                text = "text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows)
            else:
                buffer = io.StringIO()
                csv.writer(buffer, lineterminator="\n").writerows([("text", "label"), *rows])
                text = buffer.getvalue()
            utils.atomic_write_text(path, text)
    return out_dir


def main(argv=None) -> int:
    """``python sample_corpus.py --out DIR [--size small] [--custom tsv]``: write the corpus."""
    parser = argparse.ArgumentParser(description="Write the synthetic MNLI/Amazon-format sample "
                                                 "the demo and the tests run on.",
                                     formatter_class=utils.HelpFormatter)
    parser.add_argument("--out", default="dataset/sample", help="output directory")
    parser.add_argument("--size", default="small", choices=sorted(SAMPLE_SIZES),
                        help="rows per genre / reviews per label (SAMPLE_SIZES)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")
    parser.add_argument("--noisy_domain", default=None,
                        help="an Amazon domain or MNLI genre whose labels are flipped")
    parser.add_argument("--flip_prob", type=float, default=0.0,
                        help="probability that a label of --noisy_domain is flipped")
    parser.add_argument("--custom", choices=CustomProcessor.EXTENSIONS, default=None,
                        help="also write the Amazon-style corpus in the custom format "
                             "(<out>/custom/<domain>/{train,dev,test}.<ext>)")
    args = parser.parse_args(argv)
    paths = generate_sample(args.out, args.size, args.seed, args.noisy_domain, args.flip_prob)
    if args.custom:
        paths["custom"] = write_custom_corpus(paths["amazon"], os.path.join(args.out, "custom"),
                                              args.custom)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
