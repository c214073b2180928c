"""--amp auto: bf16 where the hardware computes it natively, fp32 elsewhere, logged and recorded;
the fp32 recipe keeps the default AdamW."""
import json

import pytest
import torch

import runtime
import train_domain
import training
from conftest import tiny_teacher_args


@pytest.mark.parametrize("feature, expected", [("", "off"), ("AVX512-BF16", "bf16")])
def test_auto_picks_bf16_only_with_native_support(sample, tmp_path, monkeypatch, caplog,
                                                   feature, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: feature)
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="hrkd"):
        assert train_domain.main(tiny_teacher_args(sample, out, 2, "--do_train",
                                                   "--amp", "auto")) == 0
    config = json.loads((out / "config.json").read_text())["args"]
    assert config["amp"] == expected and config["amp_requested"] == "auto"
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--amp auto")]
    assert len(line) == 1
    assert ("bf16 (cpu computes it natively: AVX512-BF16)" in line[0]) == bool(feature)
    assert ("fp32 (this cpu has no native bf16" in line[0]) != bool(feature)


def test_explicit_bf16_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: "")
    amp, reason = runtime.resolve_amp("bf16", torch.device("cpu"))
    assert amp == "bf16" and "emulated here" in reason
    assert runtime.resolve_amp("off", torch.device("cpu")) == ("off", "")


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime.native_bf16(torch.device("cpu")) == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert runtime.native_bf16(torch.device("cpu")) == ""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert runtime.native_bf16(torch.device("cpu")) == "AMX"


def test_fused_adamw_only_under_mixed_precision():
    model = torch.nn.Linear(4, 3)
    plain = training.build_optimizer({"model": model}, 1e-3, 0.01)
    fused = training.build_optimizer({"model": model}, 1e-3, 0.01, fused=True)
    assert not plain.defaults.get("fused") and fused.defaults["fused"]
