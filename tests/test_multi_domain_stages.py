"""Smoke runs of stages 3 and 4 (each ablation), --do_test, and report.py on what they wrote."""
import json
import os

import pytest
import torch

import weighting

import finetune_multi_domain
import report
import train_multi_domain

COMMON = ["--task", "amazon", "--domain", "books", "--max_seq_length", "32", "--batch_size", "4",
          "--eval_batch_size", "32", "--val_freq", "2", "--no_progress"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def teacher_run(sample, runs_root):
    out = runs_root / "train_multi_domain" / "amazon" / "seed42"
    args = COMMON + ["--data_dir", sample["amazon"], "--vocab_file", sample["vocab"],
                     "--model_config", "tiny_teacher", "--max_steps", "4",
                     "--learning_rate", "1e-3", "--output_dir", str(out)]
    assert train_multi_domain.main(args + ["--do_train"]) == 0
    assert train_multi_domain.main(args + ["--do_test"]) == 0
    return out


def test_stage3_writes_per_domain_checkpoints_and_tests(teacher_run):
    for domain in ("books", "dvd", "electronics", "kitchen"):
        assert (teacher_run / f"best_model_{domain}.bin").is_file()
    results = json.load(open(teacher_run / "results.json"))
    assert set(results["test"]["per_domain"]) == {"books", "dvd", "electronics", "kitchen"}
    assert "best_overall_checkpoint" in results["test"]


def test_stage3_graph_weighting_runs(sample, tmp_path):
    out = tmp_path / "graph_teacher"
    args = COMMON + ["--data_dir", sample["amazon"], "--vocab_file", sample["vocab"],
                     "--model_config", "tiny_teacher", "--max_steps", "2", "--use_graph",
                     "--output_dir", str(out), "--do_train"]
    assert train_multi_domain.main(args) == 0
    saved = torch.load(out / "best_model.bin", weights_only=True)
    assert "all_gnn.0.out_att.W" in saved["graph_state_dict"]


VARIANTS = {"hrkd": [], "no_hierarchy": ["--no_hierarchical"], "no_graph": ["--no_use_graph"],
            "meta_scorer": ["--domain_weighting", "meta_scorer", "--meta_objective", "gold"]}


@pytest.fixture(scope="module")
def student_runs(sample, teacher_run, runs_root):
    outs = {}
    for variant, flags in VARIANTS.items():
        out = runs_root / "finetune_multi_domain" / "amazon" / variant / "seed42"
        args = COMMON + ["--data_dir", sample["amazon"], "--teacher_dir", str(teacher_run),
                         "--student_config", "tiny_student", "--max_steps", "4",
                         "--output_dir", str(out), *flags]
        assert finetune_multi_domain.main(args + ["--do_train", "--do_test"]) == 0
        outs[variant] = out
    return outs


def test_stage4_variants_write_weights_and_results(student_runs):
    for variant, out in student_runs.items():
        results = json.load(open(out / "results.json"))
        assert len(results["test"]["per_domain"]) == 4
        saved = torch.load(out / "best_model_dvd.bin", weights_only=True)
        has_graph = variant != "no_graph"
        assert ("graph_state_dict" in saved) == has_graph
        assert (out / "domain_weights.jsonl").is_file() == has_graph
        if has_graph:
            records = [json.loads(line) for line in open(out / "domain_weights.jsonl")]
            assert [r["step"] for r in records] == [2, 4]
            for level in records[-1]["weights"]:
                assert sum(level) == pytest.approx(1.0, abs=1e-5)
            hierarchical = variant in ("hrkd", "meta_scorer")
            assert (records[-1]["hierarchy"][1] is not None) == hierarchical


def test_stage4_missing_teacher_domain_is_named(sample, teacher_run, tmp_path, capsys):
    broken = tmp_path / "teacher"
    broken.mkdir()
    for domain in ("books", "dvd"):
        os.link(teacher_run / f"best_model_{domain}.bin", broken / f"best_model_{domain}.bin")
    out = tmp_path / "student"
    args = COMMON + ["--data_dir", sample["amazon"], "--teacher_dir", str(broken),
                     "--student_config", "tiny_student", "--vocab_file", sample["vocab"],
                     "--max_steps", "2", "--output_dir", str(out), "--do_train"]
    assert finetune_multi_domain.main(args) == 1
    err = capsys.readouterr().err
    assert "electronics, kitchen" in err and "best_model_<domain>.bin" in err
    assert not out.exists()


def test_report_writes_paper_table_and_plots(runs_root, student_runs, tmp_path):
    out = tmp_path / "report"
    assert report.main(["--runs", str(runs_root), "--out", str(out), "--tasks", "amazon"]) == 0
    table = (out / "results_amazon.md").read_text()
    for row in ("Single-domain teacher", "Multi-domain teacher", "TinyBERT-KD",
                "Multi-domain KD (no graph)", "HRKD (no hierarchy)", "| HRKD |"):
        assert row in table
    header = (out / "results_amazon.csv").read_text().splitlines()[0]
    assert header == "Method,books,dvd,electronics,kitchen,Average"
    hrkd_row = next(line for line in table.splitlines() if line.startswith("| HRKD |"))
    results = json.load(open(student_runs["hrkd"] / "results.json"))["test"]["per_domain"]
    assert f"{100 * results['books']:.1f}*" in hrkd_row
    assert (out / "domain_weights_amazon_hrkd_seed42.png").stat().st_size > 1000


def test_report_fewshot_and_seed_spread(tmp_path):
    def write(path, values):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "results.json"), "w") as handle:
            json.dump({"test": {"per_domain": values},
                       "finished": {"train_steps": 10, "tested": True}}, handle)

    domains = ["books", "dvd", "electronics", "kitchen"]
    for seed, base in ((1, 0.8), (2, 0.9)):
        write(tmp_path / f"finetune_multi_domain/amazon/hrkd/seed{seed}",
              {d: base for d in domains})
    for percent, value in (("1", 0.6), ("10", 0.7)):
        write(tmp_path / f"fewshot/p{percent}/finetune_multi_domain/amazon/hrkd/seed1",
              {d: value for d in domains})
    text = report.report(str(tmp_path), str(tmp_path / "out"), ["amazon"])
    assert "85.0 ± 7.1" in text  # mean and sample std of 80 and 90
    fewshot = (tmp_path / "out" / "fewshot_amazon.md").read_text()
    assert "| 1% | 60.0* |" in fewshot and "| 10% | 70.0* |" in fewshot


def test_meta_data_picks_the_split_of_the_held_out_batches(sample, teacher_run, tmp_path,
                                                           monkeypatch):
    """--meta_data dev draws the meta objective's batches from the dev split (the trusted
    labels of the label-noise study), the default from the training split."""
    import data_processing
    seen = []
    original = weighting.MetaGraphLearner.__init__

    def spy(self, graph, teachers, groups, features, *args, **kwargs):
        seen.append([f["labels"].shape[0] for f in features])
        original(self, graph, teachers, groups, features, *args, **kwargs)

    monkeypatch.setattr(weighting.MetaGraphLearner, "__init__", spy)
    processor = data_processing.get_processor("amazon", sample["amazon"])
    domains = ("books", "dvd", "electronics", "kitchen")
    splits = {d: processor.read_splits(sample["amazon"], d, 0.9, 0.1, 42) for d in domains}
    for split in ("dev", "train"):
        args = COMMON + ["--data_dir", sample["amazon"], "--teacher_dir", str(teacher_run),
                         "--student_config", "tiny_student", "--max_steps", "1",
                         "--domain_weighting", "meta_scorer", "--meta_objective", "gold",
                         "--meta_data", split, "--output_dir", str(tmp_path / split), "--do_train"]
        assert finetune_multi_domain.main(args) == 0
        assert seen[-1] == [len(splits[d][split]) for d in domains]
    assert seen[0] != seen[1]
