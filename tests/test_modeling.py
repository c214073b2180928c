"""Encoder parity with transformers.BertModel, on a random config and on real MiniLM weights."""
import torch
import transformers

from conftest import tiny_config, tiny_inputs
from tokenization import WordPieceTokenizer
from modeling import BertClassifier, BertConfig, PRESETS, load_weights, resolve_config


def hf_reference(config: BertConfig):
    hf_config = transformers.BertConfig(**config.to_dict())
    hf_config._attn_implementation = "eager"  # attention probabilities are reported
    return transformers.BertModel(hf_config).eval()


def compare_with_hf(ours: BertClassifier, hf_model, inputs):
    input_ids, segment_ids, attention_mask = inputs
    ours.eval()
    with torch.no_grad():
        out = ours(input_ids, segment_ids, attention_mask)
        ref = hf_model(input_ids=input_ids, token_type_ids=segment_ids,
                       attention_mask=attention_mask, output_hidden_states=True,
                       output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_hidden_layers + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert (mine - theirs).abs().max() <= 1e-5
    assert len(out.attention_scores) == len(ref.attentions)
    for scores, probabilities in zip(out.attention_scores, ref.attentions):
        assert scores.shape == probabilities.shape
        assert (torch.softmax(scores, -1) - probabilities).abs().max() <= 1e-5
    return out


def test_parity_random_config(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    hf_model = hf_reference(config)
    hf_model.save_pretrained(tmp_path)  # model.safetensors in the new naming, no "bert." prefix
    ours = BertClassifier(config, num_labels=3)
    load_weights(ours, str(tmp_path))
    compare_with_hf(ours, hf_model, tiny_inputs())


def test_parity_real_minilm(minilm_dir):
    config = resolve_config(minilm_dir)
    assert config.hidden_size == 384 and config.layer_norm_eps == 1e-12
    ours = BertClassifier(config, num_labels=2)
    load_weights(ours, minilm_dir)
    hf_model = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager")
    tokenizer = WordPieceTokenizer(f"{minilm_dir}/vocab.txt")
    features = tokenizer.encode_pairs(
        ["The film was surprisingly good.", "Terrible battery; it died after a week!"],
        ["I would watch it again.", None], max_seq_length=24)
    inputs = tuple(torch.from_numpy(features[k]).long()
                   for k in ("input_ids", "segment_ids", "attention_mask"))
    out = compare_with_hf(ours, hf_model, inputs)
    assert out.hidden_states[-1].abs().sum() > 0


def test_score_layers_select_fused_attention_without_changing_outputs():
    torch.manual_seed(0)
    model = BertClassifier(tiny_config(), num_labels=3).eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        full = model(*inputs)
        partial = model(*inputs, score_layers=[1])
    assert partial.attention_scores[0] is None and partial.attention_scores[1] is not None
    assert torch.allclose(full.attention_scores[1], partial.attention_scores[1])
    for a, b in zip(full.hidden_states, partial.hidden_states):
        assert (a - b).abs().max() <= 1e-5
    assert (full.logits - partial.logits).abs().max() <= 1e-5


def test_masked_scores_are_minus_ten_thousand_plus_dot_product():
    torch.manual_seed(0)
    model = BertClassifier(tiny_config(), num_labels=3).eval()
    input_ids, segment_ids, attention_mask = tiny_inputs()
    with torch.no_grad():
        scores = model(input_ids, segment_ids, attention_mask).attention_scores[0]
    padded = attention_mask[2] == 0
    assert (scores[2, :, :, padded] < -9000).all()
    assert (scores[2, :, :, ~padded] > -100).all()


def test_multi_domain_heads_and_fit_maps():
    torch.manual_seed(0)
    student = BertClassifier(tiny_config(), num_labels=2, num_domains=3, fit_size=48).eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        per_example = student(*inputs, domain=torch.tensor([0, 2, 1]))
        for row, head in enumerate([0, 2, 1]):
            one = student(*(x[row:row + 1] for x in inputs), domain=head)
            assert (one.logits - per_example.logits[row:row + 1]).abs().max() <= 1e-5
    assert len(per_example.hidden_states) == 3
    assert all(h.shape[-1] == 48 for h in per_example.hidden_states)
    names = set(student.state_dict())
    assert {"classifiers.2.weight", "fit_denses.2.bias", "cls_pooler.dense.weight",
            "encoder.1.ffn.dense2.weight", "embeddings.token_embeddings.weight"} <= names


def test_presets():
    assert set(PRESETS) >= {"bert_base", "bert_large", "tinybert_4l_312", "tinybert_6l_768"}
    base = resolve_config("bert_base", vocab_size=30522)
    assert (base.hidden_size, base.num_hidden_layers, base.layer_norm_eps) == (768, 12, 1e-5)
    tiny = resolve_config("tinybert_4l_312", vocab_size=30522)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size) == (312, 4, 1200)
