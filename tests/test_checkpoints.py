"""Every checkpoint format loads to identical outputs; bad checkpoints fail with clear messages."""
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_config, tiny_inputs
from modeling import (BertClassifier, CheckpointError, load_weights, model_from_checkpoint,
                      read_checkpoint)

# Our (released HRKD) names -> Hugging Face names; the test's own table, written independently.
TO_HF = [
    ("embeddings.token_embeddings.", "embeddings.word_embeddings."),
    ("embeddings.segment_embeddings.", "embeddings.token_type_embeddings."),
    ("embeddings.layernorm.", "embeddings.LayerNorm."),
    (r"encoder\.(\d+)\.attention\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2."),
    (r"encoder\.(\d+)\.attention\.dense\.", r"encoder.layer.\1.attention.output.dense."),
    (r"encoder\.(\d+)\.attention\.layernorm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"encoder\.(\d+)\.ffn\.dense1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"encoder\.(\d+)\.ffn\.dense2\.", r"encoder.layer.\1.output.dense."),
    (r"encoder\.(\d+)\.ffn\.layernorm\.", r"encoder.layer.\1.output.LayerNorm."),
    ("cls_pooler.dense.", "pooler.dense."),
]


def hf_names(state_dict, prefix="", old_layernorm=False):
    renamed = {}
    for name, tensor in state_dict.items():
        if name.startswith(("classifier", "fit_denses")):
            renamed[name] = tensor
            continue
        for pattern, replacement in TO_HF:
            name = re.sub("^" + pattern, replacement, name)
        if old_layernorm and "LayerNorm" in name:
            name = name.replace(".weight", ".gamma").replace(".bias", ".beta")
        renamed[prefix + name] = tensor.clone()
    return renamed


def encoder_outputs(model):
    model.eval()
    with torch.no_grad():
        return model(*tiny_inputs())


def assert_same_encoder(a, b):
    out_a, out_b = encoder_outputs(a), encoder_outputs(b)
    for x, y in zip(out_a.hidden_states, out_b.hidden_states):
        assert torch.equal(x, y)
    for x, y in zip(out_a.attention_scores, out_b.attention_scores):
        assert torch.equal(x, y)


@pytest.fixture
def source():
    torch.manual_seed(0)
    return BertClassifier(tiny_config(), num_labels=3)


def fresh(**kwargs):
    torch.manual_seed(123)
    return BertClassifier(tiny_config(), num_labels=3, **kwargs)


def test_google_old_naming_pytorch_model_bin(tmp_path, source):
    weights = hf_names(source.state_dict(), prefix="bert.", old_layernorm=True)
    weights["cls.predictions.bias"] = torch.zeros(99)
    weights["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    target = fresh()
    pooler_before = target.cls_pooler.dense.weight.clone()
    load_weights(target, str(tmp_path))
    assert_same_encoder(source, target)
    # The released recipe does not load the pooler of a pretrained BERT.
    assert torch.equal(target.cls_pooler.dense.weight, pooler_before)


@pytest.mark.parametrize("prefix", ["", "bert."])
@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin"])
def test_hf_new_naming(tmp_path, source, prefix, file_name):
    weights = hf_names(source.state_dict(), prefix=prefix)
    weights[prefix + "embeddings.position_ids"] = torch.arange(40)[None]
    path = tmp_path / file_name
    if file_name.endswith(".safetensors"):
        save_file(weights, str(path))
    else:
        torch.save(weights, path)
    target = fresh()
    load_weights(target, str(tmp_path))
    assert_same_encoder(source, target)


def write_tinybert_dir(folder, student, per_layer_fit: bool):
    os.makedirs(folder, exist_ok=True)
    weights = hf_names(student.state_dict(), prefix="bert.")
    weights = {k: v for k, v in weights.items() if not k.startswith("fit_denses")}
    if per_layer_fit:
        weights.update({k: v.clone() for k, v in student.state_dict().items()
                        if k.startswith("fit_denses")})
    else:
        weights["fit_dense.weight"] = torch.randn(48, 32)
        weights["fit_dense.bias"] = torch.randn(48)
    torch.save(weights, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({**student.config.to_dict(), "fit_size": 48, "pre_trained": "",
                   "training": ""}, handle)
    with open(os.path.join(folder, "vocab.txt"), "w") as handle:
        handle.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(95)]))


def test_general_tinybert_directory_with_fit_denses(tmp_path):
    torch.manual_seed(0)
    student = BertClassifier(tiny_config(), num_labels=3, fit_size=48)
    write_tinybert_dir(tmp_path / "tinybert", student, per_layer_fit=True)
    target = fresh(fit_size=48)
    load_weights(target, str(tmp_path / "tinybert"))
    assert_same_encoder(student, target)  # fitted hidden states equal too


def test_general_tinybert_single_fit_dense_is_ignored(tmp_path):
    torch.manual_seed(0)
    student = BertClassifier(tiny_config(), num_labels=3, fit_size=48)
    write_tinybert_dir(tmp_path / "tinybert", student, per_layer_fit=False)
    target = fresh(fit_size=48)
    fit_before = target.fit_denses[0].weight.clone()
    load_weights(target, str(tmp_path / "tinybert"))
    assert torch.equal(target.fit_denses[0].weight, fit_before)
    raw_a, _ = student.eval().encode(*tiny_inputs())
    raw_b, _ = target.eval().encode(*tiny_inputs())
    assert all(torch.equal(x, y) for x, y in zip(raw_a, raw_b))


@pytest.mark.parametrize("file_name", ["best_model.bin", "best_model_books.bin", "ckpt_ep2.bin"])
@pytest.mark.parametrize("ddp_prefix", ["", "module."])
def test_released_hrkd_checkpoints(tmp_path, file_name, ddp_prefix):
    """Files of the released code: state_dict + numpy metadata + optimizer/scheduler."""
    torch.manual_seed(0)
    model = BertClassifier(tiny_config(), num_labels=2, num_domains=4, fit_size=48)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*tiny_inputs(), domain=1).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.save({"state_dict": {ddp_prefix + k: v for k, v in model.state_dict().items()},
                "epoch": 2, "step": np.int64(150),
                "metrics": {"acc": np.float64(0.75), "per_domain": np.array([0.7, 0.8]),
                            "f1": np.float32(0.5)},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp_path / file_name)
    target = BertClassifier(tiny_config(), num_labels=2, num_domains=4, fit_size=48)
    meta = load_weights(target, str(tmp_path / file_name))
    assert float(meta["metrics"]["acc"]) == 0.75
    model.eval(), target.eval()
    with torch.no_grad():
        for domain in range(4):
            assert torch.equal(model(*tiny_inputs(), domain=domain).logits,
                               target(*tiny_inputs(), domain=domain).logits)


def test_project_checkpoint_rebuilds_itself(tmp_path, source):
    torch.save({"state_dict": source.state_dict(), "config": source.config.to_dict(),
                "model_args": source.model_args()}, tmp_path / "best_model.bin")
    rebuilt = model_from_checkpoint(str(tmp_path))
    source.eval()
    with torch.no_grad():
        assert torch.equal(source(*tiny_inputs()).logits, rebuilt.eval()(*tiny_inputs()).logits)


def test_shape_mismatch_names_weight_and_shapes(tmp_path, source):
    weights = source.state_dict()
    weights["embeddings.token_embeddings.weight"] = torch.zeros(120, 32)
    torch.save({"state_dict": weights}, tmp_path / "best_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_weights(fresh(), str(tmp_path / "best_model.bin"))
    message = str(err.value)
    assert "best_model.bin" in message and "embeddings.token_embeddings.weight" in message
    assert "(120, 32)" in message and "(99, 32)" in message


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.bin: checkpoint not found"):
        load_weights(fresh(), str(tmp_path / "nothing.bin"))
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_weights(fresh(), str(tmp_path))


class _Payload:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_without_running(tmp_path, source):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": source.state_dict(), "evil": _Payload(str(marker))},
               tmp_path / "evil.bin")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil.bin: refused: .*\(io.open\)") as refused:
        read_checkpoint(str(tmp_path / "evil.bin"))
    assert not marker.exists()
    # Why it was refused, never the advice to turn safe loading off.
    assert "weights_only" not in str(refused.value) and "False" not in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1


def test_missing_and_unexpected_weights_are_logged(tmp_path, source, caplog):
    weights = {k: v for k, v in source.state_dict().items() if "encoder.1." not in k}
    weights["something.else"] = torch.zeros(3)
    torch.save({"state_dict": weights}, tmp_path / "best_model.bin")
    with caplog.at_level("INFO", logger="modeling"):
        load_weights(fresh(), str(tmp_path / "best_model.bin"))
    assert "encoder.1.ffn.dense1.weight" in caplog.text and "something.else" in caplog.text
