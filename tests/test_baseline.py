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


def test_tfidf_baseline_refuses_an_unknown_domain(sample, tmp_path, capsys):
    assert baseline_tfidf.main(["--task", "amazon", "--data_dir", sample["amazon"],
                                "--output_dir", str(tmp_path / "out"), "--domains", "music"]) == 1
    assert "unknown amazon domain 'music'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
