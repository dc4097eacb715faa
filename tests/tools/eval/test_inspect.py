"""Lenses on tiny random models of every supported family (built from configs, no downloads)."""

import pytest
import torch

from megatron_patches.errors import ConfigError
from tests.tiny_hf import build_model
from tests.tools.eval.cli import run_eval
from tools.eval import inspect

TEXT = "the capital of france is paris."


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def family_model(request, tmp_path_factory):
    path = build_model(
        tmp_path_factory.mktemp(request.param) / "m", family=request.param, num_hidden_layers=3
    )
    return path, *inspect.load(str(path))


def test_the_last_layers_lens_is_the_models_own_prediction(family_model):
    _, model, tokenizer = family_model
    tokens, probs, ids = inspect.logit_lens(model, tokenizer, TEXT, k=5)
    with torch.no_grad():
        logits = model(**tokenizer(TEXT, return_tensors="pt")).logits[0]
    top = torch.softmax(logits, -1).topk(5, -1)
    assert probs.shape == (3, len(tokens), 5)
    assert torch.equal(ids[-1], top.indices)
    torch.testing.assert_close(probs[-1], top.values, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ids[0], ids[-1])  # earlier layers read differently


def test_a_layer_that_adds_nothing_has_cosine_distance_zero(family_model):
    _, model, tokenizer = family_model
    layer = model.model.layers[1]
    saved = layer.self_attn.o_proj.weight.clone(), layer.mlp.down_proj.weight.clone()
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    try:
        tokens, distances = inspect.cosine_distances(model, tokenizer, TEXT)
    finally:
        with torch.no_grad():
            layer.self_attn.o_proj.weight.copy_(saved[0])
            layer.mlp.down_proj.weight.copy_(saved[1])
    assert distances.shape == (3, len(tokens))
    assert distances[1].abs().max() < 1e-6
    assert distances[0].min() > 1e-4 and distances[2].min() > 1e-4


def test_attention_weights_are_causal_distributions(family_model):
    _, model, tokenizer = family_model
    tokens, weights = inspect.attention(model, tokenizer, TEXT, layer=2, head=3)
    assert weights.shape == (len(tokens), len(tokens))
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(tokens)))
    assert torch.all(weights.triu(1) == 0)


def test_llama_attention_equals_a_hand_computation(tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    path = build_model(tmp_path / "llama")
    model, tokenizer = inspect.load(str(path))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    head, kv_head, dim = 3, 1, 8  # 4 heads share 2 KV heads: head 3 reads KV head 1
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        attn = model.model.layers[0].self_attn
        q = attn.q_proj(hidden).view(1, -1, 4, dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, -1, 2, dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        scores = q[0, head] @ k[0, kv_head].T / dim**0.5
        causal = torch.ones_like(scores, dtype=torch.bool).triu(1)
        expected = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)
    _, weights = inspect.attention(model, tokenizer, TEXT, layer=0, head=head)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)


def test_cli_prints_tables_and_draws_the_heat_maps(tmp_path):
    path = build_model(tmp_path / "qwen2", family="qwen2")
    png = tmp_path / "lens.png"
    options = f"--hf {path} --top-k 3 --attention 1 0 -1 0 --plot {png}".split()
    proc = run_eval("inspect", *options, "--text", TEXT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "cosine distance between each layer's input and output"
    assert [line.split()[0] for line in lines[2:4]] == ["0", "1"]
    assert any(line.startswith("logit lens after token") for line in lines)
    assert lines[-2].startswith("layer 1 head 0: attention of token ") and "on token 0 ('the')" in lines[-2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unsupported_family_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        ConfigError, match="model family 'gpt2' is not supported; supported: \\['llama', 'qwen2'"
    ):
        inspect.load(str(tmp_path / "gpt2"))
    with pytest.raises(ConfigError, match="is not an HF model directory"):
        inspect.load(str(tmp_path))
