"""baseline_tfidf.py: C chosen on dev, results in the runs' layout, a row of report.py's table."""
import json

import baseline_tfidf
import report


def test_tfidf_baseline_writes_a_report_row(sample, tmp_path):
    out = tmp_path / "runs" / "tfidf" / "amazon"
    assert baseline_tfidf.main(["--task", "amazon", "--data_dir", sample["amazon"],
                                "--output_dir", str(out), "--c_grid", "0.1", "10"]) == 0
    results = json.load(open(out / "books" / "results.json"))
    assert results["c"] in (0.1, 10) and 0.0 <= results["test"]["per_domain"]["books"] <= 1.0
    table = report.collect(str(tmp_path / "runs"), "amazon")
    cells = table["TF-IDF + logistic regression"]
    assert all(len(cells[d]) == 1 for d in ("books", "dvd", "electronics", "kitchen"))


def test_sentence_pairs_get_premise_hypothesis_and_overlap_views(sample, tmp_path):
    from data_processing import Example
    views = baseline_tfidf.pair_views([Example("A man is sleeping .", "The man sleeps", 0)])
    assert views == [["A man is sleeping ."], ["The man sleeps"], ["out_the in_man out_sleeps"]]
    out = tmp_path / "runs" / "tfidf" / "mnli"
    assert baseline_tfidf.main(["--task", "mnli", "--data_dir", sample["mnli"],
                                "--output_dir", str(out), "--c_grid", "1"]) == 0
    results = json.load(open(out / "fiction" / "results.json"))
    assert 0.0 <= results["test"]["per_domain"]["fiction"] <= 1.0


def test_tfidf_baseline_refuses_an_unknown_domain(sample, tmp_path, capsys):
    assert baseline_tfidf.main(["--task", "amazon", "--data_dir", sample["amazon"],
                                "--output_dir", str(tmp_path / "out"), "--domains", "music"]) == 1
    assert "unknown amazon domain 'music'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _fake_stage4_run(root, variant, seed, accuracy, kitchen_weight):
    """A finished stage-4 run: results.json and two evaluations of domain weights (2 levels)."""
    run = root / "finetune_multi_domain" / "amazon" / variant / f"seed{seed}"
    run.mkdir(parents=True)
    domains = ["books", "dvd", "electronics", "kitchen"]
    (run / "results.json").write_text(json.dumps(
        {"test": {"per_domain": dict(zip(domains, accuracy))},
         "finished": {"train_steps": 20, "tested": True}}))
    rest = (1 - kitchen_weight) / 3
    level = [rest, rest, rest, kitchen_weight]
    with open(run / "domain_weights.jsonl", "w") as handle:
        for step in (10, 20):
            handle.write(json.dumps({"step": step, "weights": [[0.25] * 4, level]}) + "\n")


def test_study_summary_averages_each_method_over_its_seeds(tmp_path):
    _fake_stage4_run(tmp_path, "uniform", 42, [0.70, 0.72, 0.80, 0.60], 0.25)
    _fake_stage4_run(tmp_path, "meta_scorer_gold", 42, [0.72, 0.74, 0.80, 0.62], 0.05)
    _fake_stage4_run(tmp_path, "meta_scorer_gold", 43, [0.74, 0.76, 0.82, 0.64], 0.15)
    header, rows = report.study_summary(str(tmp_path), "amazon", "kitchen")
    assert header[:3] == ["Method", "seeds", "w[kitchen] (1/D = 0.250)"]
    by_method = {row[0]: row for row in rows}
    assert by_method["HRKD (uniform weights)"] == ["HRKD (uniform weights)", "1", "0.250*",
                                                   "74.0*", "60.0*"]
    # kitchen's weight averaged over levels: (0.25 + 0.05) / 2 and (0.25 + 0.15) / 2; the
    # others' mean accuracy 75.33 and 77.33.
    scorer = by_method["HRKD (meta-learned domain scorer, gold objective)"]
    assert scorer[1] == "2" and scorer[2] == "0.175 ± 0.035"
    assert scorer[3] == "76.3 ± 1.4" and scorer[4] == "63.0 ± 1.4"
    header, rows = report.study_table(str(tmp_path), "amazon", "kitchen")
    assert len(rows) == 3 and rows[0][1:4] == ["0.2500", "0.2500", "0.2500"]
