"""HF -> Megatron -> HF and Megatron re-sharding are bit-exact for every family and layout (in-process)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.tools.convert import tiny
from tools.convert import commands, mcore_io
from tools.convert.mapping import normalize_rows


def _divides(case: str, tp: int) -> bool:
    overrides = tiny.CASES[case][1]
    groups = overrides.get("num_key_value_heads", tiny.BASE["num_key_value_heads"])
    return groups % tp == 0 and tiny.BASE["num_attention_heads"] % tp == 0


ROUND_TRIPS = [(case, tp, pp) for case in tiny.CASES for tp, pp in tiny.LAYOUTS if _divides(case, tp)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: tiny.save_hf(case, root / case, seed=n) for n, case in enumerate(tiny.CASES)}


def _config_dict(directory) -> dict:
    config = transformers.AutoConfig.from_pretrained(directory).to_dict()
    config.pop("_name_or_path", None)
    return config


@pytest.mark.parametrize(("case", "tp", "pp"), ROUND_TRIPS)
def test_hf_to_mcore_to_hf_is_bit_exact(case, tp, pp, hf_dirs, tmp_path):
    commands.hf2mcore(hf_dirs[case], tmp_path / "mcore", tp=tp, pp=pp, quiet=True)
    commands.mcore2hf(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dirs[case]), tiny.hf_tensors(tmp_path / "hf"))
    assert _config_dict(tmp_path / "hf") == _config_dict(hf_dirs[case])
    assert (tmp_path / "hf" / "tokenizer_config.json").read_text() == (
        hf_dirs[case] / "tokenizer_config.json"
    ).read_text()


def test_every_layout_is_covered():
    assert {(tp, pp) for _, tp, pp in ROUND_TRIPS} == set(tiny.LAYOUTS)


def test_release_layout_on_disk(hf_dirs, tmp_path):
    commands.hf2mcore(hf_dirs["llama_gqa"], tmp_path / "ckpt", tp=2, pp=2, quiet=True)
    assert mcore_io.read_tracker(tmp_path / "ckpt") == "release"
    assert (tmp_path / "ckpt" / "config.json").is_file()
    state = mcore_io.load_rank(tmp_path / "ckpt" / "release", 1, 1, 2)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
    assert state["model_config"]["num_query_groups"] == 4 and state["pipeline_layers"] == [2, 2]
    assert state["model"]["output_layer.weight"].shape == (
        128,
        64,
    )  # vocab 100 padded to 128 * TP, split in 2
    assert "decoder.layers.1.mlp.linear_fc1.weight" in state["model"]  # layer 3, local number 1
    assert "decoder.layers.2.input_layernorm.weight" not in state["model"]


def test_reshard_chain_is_bit_exact(hf_dirs, tmp_path):
    source = hf_dirs["qwen2"]
    commands.hf2mcore(source, tmp_path / "tp4pp2", tp=4, pp=2, quiet=True)
    commands.mcore2mcore(tmp_path / "tp4pp2", tmp_path / "tp2pp4", tp=2, pp=4, quiet=True)
    commands.mcore2mcore(tmp_path / "tp2pp4", tmp_path / "tp1pp1", tp=1, pp=1, quiet=True)
    commands.mcore2hf(tmp_path / "tp1pp1", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "hf"))
    direct = mcore_io.load_rank(tmp_path / "tp1pp1" / "release", 0, 0, 1)["model"]
    commands.hf2mcore(source, tmp_path / "direct", tp=1, pp=1, quiet=True)
    for name, tensor in mcore_io.load_rank(tmp_path / "direct" / "release", 0, 0, 1)["model"].items():
        assert (tensor is None and direct[name] is None) or torch.equal(tensor, direct[name]), name


def test_uneven_pipeline_and_te_spec_round_trip(hf_dirs, tmp_path):
    source = hf_dirs["qwen3"]
    commands.hf2mcore(source, tmp_path / "te", tp=2, pp=3, spec="te", first=2, last=1, quiet=True)
    middle = mcore_io.load_rank(tmp_path / "te" / "release", 0, 1, 3)
    assert middle["pipeline_layers"] == [2, 1, 1]
    model = middle["model"]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in model
    assert "decoder.layers.0.input_layernorm.weight" not in model
    assert model["decoder.layers.0.self_attention.core_attention._extra_state"].dtype == torch.uint8
    commands.mcore2mcore(tmp_path / "te", tmp_path / "local", tp=1, pp=2, quiet=True)
    commands.mcore2hf(tmp_path / "local", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "hf"))


def test_dtype_cast_and_sharded_hf_files(hf_dirs, tmp_path):
    source = hf_dirs["mistral"]
    commands.hf2mcore(source, tmp_path / "bf16", tp=2, pp=1, dtype="bf16", quiet=True)
    commands.mcore2hf(tmp_path / "bf16", tmp_path / "hf", max_shard_bytes=20_000, quiet=True)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 3
    expected = {name: t.to(torch.bfloat16) for name, t in tiny.hf_tensors(source).items()}
    tiny.assert_same_tensors(expected, tiny.hf_tensors(tmp_path / "hf"))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
    # The sharded export reads back (index + shards) to the same Megatron weights.
    commands.hf2mcore(tmp_path / "hf", tmp_path / "again", tp=2, pp=1, quiet=True)
    for rank in range(2):
        first = mcore_io.load_rank(tmp_path / "bf16" / "release", rank, 0, 1)["model"]
        again = mcore_io.load_rank(tmp_path / "again" / "release", rank, 0, 1)["model"]
        assert all(v is None or torch.equal(v, again[k]) for k, v in first.items())


def test_pytorch_bin_input_converts_like_safetensors(hf_dirs, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dirs["llama_gqa"] / "config.json").read_text())
    torch.save(tiny.hf_tensors(hf_dirs["llama_gqa"]), bin_dir / "pytorch_model.bin")
    commands.hf2mcore(bin_dir, tmp_path / "from_bin", tp=2, pp=2, quiet=True)
    commands.mcore2hf(tmp_path / "from_bin", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dirs["llama_gqa"]), tiny.hf_tensors(tmp_path / "hf"))


def test_baichuan2_converts_to_the_equivalent_llama(tmp_path):
    baichuan, llama = tiny.save_baichuan_pair(tmp_path)
    commands.hf2mcore(baichuan, tmp_path / "b", tp=2, pp=2, quiet=True)
    commands.hf2mcore(llama, tmp_path / "l", tp=2, pp=2, quiet=True)
    for tp_rank in range(2):
        for pp_rank in range(2):
            got = mcore_io.load_rank(tmp_path / "b" / "release", tp_rank, pp_rank, 2)["model"]
            want = mcore_io.load_rank(tmp_path / "l" / "release", tp_rank, pp_rank, 2)["model"]
            assert sorted(got) == sorted(want)
            for name, tensor in want.items():
                if name == "output_layer.weight":  # NormHead rows: normalized once, up to rounding
                    torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)
                else:
                    assert tensor is None or torch.equal(got[name], tensor), name
    assert (tmp_path / "b" / "modeling_baichuan.py").is_file()
    commands.mcore2hf(tmp_path / "b", tmp_path / "back", quiet=True)
    expected = tiny.hf_tensors(baichuan)
    expected["lm_head.weight"] = normalize_rows(expected["lm_head.weight"])
    tiny.assert_same_tensors(expected, tiny.hf_tensors(tmp_path / "back"))
    assert (tmp_path / "back" / "modeling_baichuan.py").is_file()


def _logits(directory, model_class, tokens) -> torch.Tensor:
    model = model_class.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def test_hf2hf_qwen2_as_llama_and_back(hf_dirs, tmp_path):
    source = hf_dirs["qwen2"]
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    commands.hf2hf(source, tmp_path / "llama", to="llama", quiet=True)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "llama")
    assert config.architectures == ["LlamaForCausalLM"] and config.attention_bias
    reference = _logits(source, transformers.Qwen2ForCausalLM, tokens)
    as_llama = _logits(tmp_path / "llama", transformers.LlamaForCausalLM, tokens)
    torch.testing.assert_close(as_llama, reference, atol=1e-5, rtol=0)
    commands.hf2hf(tmp_path / "llama", tmp_path / "qwen2", to="qwen2", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(source), tiny.hf_tensors(tmp_path / "qwen2"))
    torch.testing.assert_close(_logits(tmp_path / "qwen2", transformers.Qwen2ForCausalLM, tokens), reference)


def test_pre_transformers_5_config_style_reads_the_same(hf_dirs, tmp_path):
    """Older config.json files keep rope_theta / rope_scaling at the top level."""
    hf = tmp_path / "v4"
    hf.mkdir()
    for path in hf_dirs["llama31"].iterdir():
        (hf / path.name).write_bytes(path.read_bytes())
    config = json.loads((hf / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "torch_dtype": config.pop("dtype")}
    (hf / "config.json").write_text(json.dumps(config))
    commands.hf2mcore(hf, tmp_path / "mcore", tp=2, quiet=True)
    cfg = mcore_io.read_model_config(tmp_path / "mcore")
    assert (cfg.rotary_base, cfg.use_rope_scaling, cfg.rope_scaling_factor) == (500000.0, True, 8.0)
    commands.mcore2hf(tmp_path / "mcore", tmp_path / "hf", quiet=True)
    assert _config_dict(tmp_path / "hf") == _config_dict(hf_dirs["llama31"])
    tiny.assert_same_tensors(tiny.hf_tensors(hf), tiny.hf_tensors(tmp_path / "hf"))
