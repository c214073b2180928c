"""bench.py: the alternating timing of the HRKD pair, and a tiny end-to-end run."""
import json

import pytest
import torch

import bench


def test_paired_timing_alternates_and_reports_the_ratio(monkeypatch):
    calls = []
    seconds = {"slow": iter([3.0, 2.0, 2.0, 2.0, 2.2, 2.0]),
               "fast": iter([9.0, 1.0, 1.0, 1.0, 1.0, 1.0])}

    def fake_timed_call(step, device):
        calls.append(step.__name__)
        return next(seconds[step.__name__])

    def slow():
        pass

    def fast():
        pass

    monkeypatch.setattr(bench, "timed_call", fake_timed_call)
    timings, ratio = bench.time_paired((slow, fast), rounds=5, warmup=1, device=torch.device("cpu"))
    # A B, then B A, ...: a drift in the machine's load hits both alike.
    assert calls == ["slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow", "slow", "fast",
                     "fast", "slow"]
    assert [t["steps"] for t in timings] == [5, 5]
    assert timings[0]["median_s"] == 2.0 and timings[1]["median_s"] == 1.0
    assert ratio["rounds"] == 5 and ratio["median"] == 2.0
    assert ratio["first_half"] == 2.0 and ratio["second_half"] == 2.0


def test_bench_runs_the_hrkd_pair_only(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--cases", "hrkd", "--pairs", "2", "--warmup", "0",
                       "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["train_step"]) == {"stage4_hrkd", "stage4_hrkd_straightforward",
                                          "stage4_hrkd_straightforward_again",
                                          "stage4_hrkd_cached"}
    assert results["hrkd_cached_speedup_vs_straightforward"] == \
        results["hrkd_cached_vs_straightforward_rounds"]["median"]
    rounds = results["hrkd_vs_straightforward_rounds"]
    assert rounds["rounds"] == 2 and results["hrkd_speedup_vs_straightforward"] == rounds["median"]
    start, end = results["matmul_gflop_per_s_start_end"]
    assert results["matmul_gflop_per_s"] == max(start, end)
    for timing in results["train_step"].values():
        assert timing["gflop_per_step"] > 0
        assert timing["fraction_of_matmul_rate"] == pytest.approx(
            timing["gflop_per_s"] / results["matmul_gflop_per_s"])
    assert results["inference"] == {}


def test_bench_times_textbrewer_beside_stage2(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "tiny", "--cases", "peer", "--pairs", "2", "--warmup", "0",
                       "--out", str(out)]) == 0
    peer = json.loads(out.read_text())["peer"]
    assert peer["textbrewer_step_s"] > 0 and peer["ours_step_s"] > 0
    assert peer["ours_vs_textbrewer"] == peer["rounds"]["median"] and peer["ours_amp"] == "off"
