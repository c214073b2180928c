"""Your own domains (--task custom): the format in TSV, CSV and JSON Lines through all four
stages, export and predict; every bad input stops with one line naming the file (and line)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import export
import finetune_domain
import finetune_multi_domain
import predict
import train_domain
import train_multi_domain
from conftest import ROOT
from data_processing import CustomProcessor, DataError
from sample_corpus import write_custom_corpus

DOMAINS = ("books", "dvd", "kitchen")
LABELS = ("not_ok", "ok")  # not the Amazon names: they must come from the data


def corpus(sample, folder, extension, with_dev=True):
    return write_custom_corpus(sample["amazon"], str(folder), extension, DOMAINS,
                               with_dev=with_dev, label_names=LABELS)


def common(sample, data, out, *extra):
    return ["--task", "custom", "--data_dir", data, "--vocab_file", sample["vocab"],
            "--max_seq_length", "16", "--batch_size", "2", "--max_steps", "2", "--val_freq", "2",
            "--no_progress", "--do_train", "--do_test", "--output_dir", str(out), *extra]


@pytest.mark.parametrize("extension", CustomProcessor.EXTENSIONS)
def test_four_stages_export_and_predict_on_a_custom_corpus(sample, tmp_path, extension, capsys):
    data = corpus(sample, tmp_path / "data", extension)
    processor = CustomProcessor(data)
    assert processor.domains == list(DOMAINS) and processor.labels == list(LABELS)
    teacher = ["--model_config", "tiny_teacher"]
    student = ["--student_config", "tiny_student"]
    assert train_domain.main(common(sample, data, tmp_path / "s1", "--domain", "dvd",
                                    *teacher)) == 0
    assert finetune_domain.main(common(sample, data, tmp_path / "s2", "--domain", "dvd",
                                       "--teacher_dir", str(tmp_path / "s1"), *student)) == 0
    assert train_multi_domain.main(common(sample, data, tmp_path / "s3", "--domain",
                                          processor.fit_domain, *teacher)) == 0
    assert finetune_multi_domain.main(common(sample, data, tmp_path / "s4", "--domain",
                                             processor.fit_domain, "--teacher_dir",
                                             str(tmp_path / "s3"), *student)) == 0
    config = json.load(open(tmp_path / "s4" / "config.json"))
    assert config["labels"] == list(LABELS) and config["domains"] == list(DOMAINS)
    results = json.load(open(tmp_path / "s4" / "results.json"))
    assert sorted(results["test"]["per_domain"]) == sorted(DOMAINS)
    assert export.main([str(tmp_path / "s4"), "--all_domains", "--out",
                        str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert predict.main([str(tmp_path / "hf" / "kitchen"), "a sturdy blender",
                         "--format", "jsonl"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["label"] in LABELS and sorted(record["probabilities"]) == list(LABELS)


def test_missing_dev_is_taken_from_train_by_dev_ratio(sample, tmp_path, caplog):
    data = corpus(sample, tmp_path / "data", "tsv", with_dev=False)
    processor = CustomProcessor(data)
    with caplog.at_level("INFO", logger="hrkd"):
        splits = processor.read_splits(data, "books", dev_ratio=0.2)
    train_rows = len(open(os.path.join(data, "books", "train.tsv")).readlines()) - 1
    assert len(splits["dev"]) == round(0.2 * train_rows)
    assert len(splits["train"]) + len(splits["dev"]) == train_rows
    assert "no dev file" in caplog.text


def test_labels_file_fixes_the_order(sample, tmp_path):
    data = corpus(sample, tmp_path / "data", "csv")
    (tmp_path / "data" / "labels.txt").write_text("ok\nnot_ok\n")
    assert CustomProcessor(data).labels == ["ok", "not_ok"]


def test_the_launchers_run_the_custom_task(sample, tmp_path):
    data = corpus(sample, tmp_path / "data", "jsonl")
    env = dict(os.environ, PYTHON="echo", TASKS="custom", CUSTOM_DIR=data)
    result = subprocess.run(["bash", "train_multi_domain.sh"], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # The fit domain (books, the largest) is the task's own: the script takes it.
    assert f"--task custom --data_dir {data} " in result.stdout
    assert "--domain" not in result.stdout
    assert CustomProcessor(data).fit_domain == "books"


def _rewrite(path, old, new):
    text = path.read_text()
    path.write_text(text.replace(old, new, 1))


BAD = {
    "no text column": (lambda d: _rewrite(d / "dvd" / "train.tsv", "text\t", "body\t"),
                       "dvd/train.tsv:1: no 'text (or sentence)' column"),
    "no label column": (lambda d: _rewrite(d / "dvd" / "train.tsv", "\tlabel", "\tstars"),
                        "dvd/train.tsv:1: no 'label' column"),
    "unseen test label": (lambda d: _rewrite(d / "kitchen" / "test.tsv", "\tok\n", "\tmeh\n"),
                          "kitchen/test.tsv:"),
    "no training file": (lambda d: os.remove(d / "dvd" / "train.tsv"), "dvd: no train file"),
    "empty training file": (lambda d: (d / "dvd" / "train.tsv").write_text("text\tlabel\n"),
                            "dvd/train.tsv: no examples"),
    "wrong field count": (lambda d: _rewrite(d / "books" / "train.tsv", "\tok\n", "\tok\textra\n"),
                          "books/train.tsv:"),
    "one domain only": (lambda d: [shutil.rmtree(d / x) for x in ("dvd", "kitchen")],
                        "the multi-domain stages need two or more domains"),
    "duplicate by case": (lambda d: shutil.copytree(d / "dvd", d / "DVD"),
                          "domain names differ only by case"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_custom_input_stops_with_one_line(sample, tmp_path, case):
    data = tmp_path / "data"
    corpus(sample, data, "tsv")
    mutate, expected = BAD[case]
    mutate(data)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_multi_domain.py"),
                             *common(sample, str(data), out, "--domain", "books",
                                     "--model_config", "tiny_teacher")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (data / "cache").exists()


def test_jsonl_line_that_is_not_json(sample, tmp_path):
    data = corpus(sample, tmp_path / "data", "jsonl")
    path = tmp_path / "data" / "dvd" / "dev.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"text": "broken'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"dvd/dev.jsonl:3: not JSON"):
        CustomProcessor(data).read_splits(data, "dvd")
