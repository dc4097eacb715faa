"""The pure split/merge math, checked on small hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from megatron_patches.errors import ConfigError
from megatron_patches.formats.model_config import ModelConfig
from tools.convert import layout, mapping
from tools.convert.families import FAMILIES


def _rows(*labels: float) -> torch.Tensor:
    return torch.tensor(labels).unsqueeze(1)


def test_group_qkv_is_group_major_queries_then_key_then_value():
    q, k, v = _rows(0, 1, 2, 3), _rows(10, 11), _rows(20, 21)  # 4 heads, 2 groups, head_dim 1
    fused = mapping.group_qkv(q, k, v, heads=4, groups=2)
    assert fused.squeeze(1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert [t.squeeze(1).tolist() for t in mapping.ungroup_qkv(fused, 4, 2)] == [
        [0, 1, 2, 3],
        [10, 11],
        [20, 21],
    ]
    shards = mapping.split_qkv(fused, heads=4, groups=2, tp=2)
    assert [s.squeeze(1).tolist() for s in shards] == [[0, 1, 10, 20], [2, 3, 11, 21]]


def test_group_qkv_handles_bias_and_head_dim():
    heads, groups, d = 8, 2, 3
    q, k, v = torch.randn(heads * d), torch.randn(groups * d), torch.randn(groups * d)
    fused = mapping.group_qkv(q, k, v, heads, groups)
    assert (
        fused[: 4 * d].equal(q[: 4 * d])
        and fused[4 * d : 5 * d].equal(k[:d])
        and fused[5 * d : 6 * d].equal(v[:d])
    )
    assert all(a.equal(b) for a, b in zip(mapping.ungroup_qkv(fused, heads, groups), (q, k, v), strict=True))


def test_gated_split_gives_each_rank_its_gate_and_up_halves():
    gate, up = _rows(0, 1, 2, 3), _rows(10, 11, 12, 13)
    shards = mapping.split_gated(torch.cat([gate, up]), tp=2)
    assert [s.squeeze(1).tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    assert mapping.merge_gated(shards).squeeze(1).tolist() == [0, 1, 2, 3, 10, 11, 12, 13]


def test_vocab_is_padded_to_128_times_tp_and_truncated_back():
    cfg = ModelConfig(vocab_size=300, hidden_size=4, num_attention_heads=1)
    entry = mapping.VocabParallel("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))
    full = torch.randn(300, 4)
    shards = entry.split(full, 2, cfg)
    assert [s.shape[0] for s in shards] == [256, 256]  # 300 -> 512 = 2 x 128 x 2
    assert torch.count_nonzero(shards[1][300 - 256 :]) == 0
    assert entry.merge(shards, cfg).equal(full)


def test_replicated_merge_refuses_diverged_copies():
    entry = mapping.Replicated("decoder.final_layernorm.weight", ("model.norm.weight",))
    with pytest.raises(ConfigError, match="TP rank 1 holds a different copy"):
        entry.merge([torch.ones(3), torch.zeros(3)], ModelConfig())


def test_split_refuses_a_ragged_split():
    with pytest.raises(ConfigError, match="size 6 along dim 1 is not divisible by 4"):
        mapping.RowParallel("x", ("y",)).split(torch.zeros(2, 6), 4, ModelConfig())


def test_normalize_rows_gives_unit_rows():
    rows = mapping.normalize_rows(torch.randn(5, 7) * 3)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize(
    ("layers", "pp", "first", "last", "counts"),
    [
        (8, 2, None, None, [4, 4]),
        (7, 3, 1, None, [1, 3, 3]),
        (7, 3, None, 3, [2, 2, 3]),
        (6, 3, 2, 2, [2, 2, 2]),
        (5, 2, 2, 3, [2, 3]),
    ],
)
def test_stage_layer_counts(layers, pp, first, last, counts):
    assert layout.stage_layer_counts(layers, pp, first, last) == counts


@pytest.mark.parametrize(
    ("layers", "pp", "first", "last", "message"),
    [
        (6, 4, None, None, "num_layers (6) is not divisible by PP (4)"),
        (7, 3, 2, None, "cannot place 7 layers on 3 stages with first=2 last=None"),
        (6, 1, 2, None, "uneven pipeline stages need PP > 1"),
        (6, 2, 0, None, "cannot place 6 layers on 2 stages with first=0"),
    ],
)
def test_impossible_stage_splits_name_the_numbers(layers, pp, first, last, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout.stage_layer_counts(layers, pp, first, last)


def test_te_names_round_trip_and_extra_state_is_dropped():
    local = "decoder.layers.3.pre_mlp_layernorm.weight"
    te = layout.to_spec(local, "te")
    assert te == "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    assert layout.from_spec(te) == local
    assert layout.from_spec("decoder.layers.0.mlp.linear_fc1._extra_state") is None
    assert layout.to_spec(local, "local") == local


def _family_config(family: str) -> ModelConfig:
    """A one-layer model with every feature ``family`` maps (GQA, biases, norms, experts, MLA)."""
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8, vocab_size=300)
    cfg.num_query_groups = 8 if family == "baichuan2" else 4
    cfg.add_qkv_bias = family in ("qwen2", "qwen2_moe")
    cfg.qk_layernorm = family in ("qwen3", "qwen3_moe")
    if family.endswith(("_moe", "mixtral")):  # 3 routed experts; Qwen2-MoE's gated shared expert
        cfg.num_moe_experts, cfg.moe_ffn_hidden_size = 3, 24
        cfg.moe_shared_expert_intermediate_size = 40 if family == "qwen2_moe" else None
        cfg.moe_shared_expert_gate = family == "qwen2_moe"
    if family.startswith("deepseek"):  # MLA with query compression, 3 routed experts + a shared one
        cfg.multi_latent_attention, cfg.qk_layernorm, cfg.q_lora_rank, cfg.kv_lora_rank = True, True, 16, 12
        cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim = 4, 4, 6
        cfg.num_moe_experts, cfg.moe_ffn_hidden_size, cfg.moe_shared_expert_intermediate_size = 3, 24, 48
        cfg.moe_router_enable_expert_bias = family == "deepseek_v3"
    return cfg


def _whole_tensors(family: str, cfg: ModelConfig):
    """(entry, parameter name, its HF tensors, its canonical tensor) of every mapped parameter, random."""
    gen = torch.Generator().manual_seed(0)
    shapes = layout.canonical_shapes(cfg)
    for entry, layer in FAMILIES[family].expand(cfg):
        name, _ = entry.at(layer)
        if not name:
            continue
        hf = [
            torch.randn(m.shape, generator=gen)
            for m in entry.to_hf(torch.empty(shapes[name], device="meta"), cfg)
        ]
        yield entry, name, hf, entry.to_mcore(hf, cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shard_fast_path_equals_split_of_the_whole(family):
    """hf2mcore computes each rank's piece from its own rows; it must equal splitting the whole tensor."""
    cfg = _family_config(family)
    for entry, name, hf, whole in _whole_tensors(family, cfg):
        for tp in (1, 2, 4):
            for rank, piece in enumerate(entry.split(whole, tp, cfg)):
                assert entry.shard(hf, cfg, tp, rank).equal(piece), (name, tp, rank)
            assert entry.merge(entry.split(whole, tp, cfg), cfg).equal(whole), (name, tp)


# Entries whose HF tensors are rows of the shards: mcore2hf writes those rows where they lie.
_JOINED_BY_ROWS = (mapping.ColumnParallel, mapping.VocabParallel, mapping.GatedMLP, mapping.Replicated)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_pieces_are_the_merged_hf_tensors_and_views_of_the_shards(family):
    """mcore2hf writes each HF tensor as row blocks of the TP shards, one after another: byte for byte
    ``to_hf(merge(shards))``, and where only rows are joined (all but row-parallel) with no copy."""
    cfg = _family_config(family)
    for entry, name, _, whole in _whole_tensors(family, cfg):
        for tp in (1, 2, 4):
            shards = entry.split(whole, tp, cfg)
            pieces = entry.hf_pieces(shards, cfg)
            for want, parts in zip(entry.to_hf(entry.merge(shards, cfg), cfg), pieces, strict=True):
                joined = torch.cat([part.reshape(-1) for part in parts])
                assert joined.equal(want.reshape(-1)), (name, tp)
            if isinstance(entry, _JOINED_BY_ROWS):
                storages = {shard.untyped_storage().data_ptr() for shard in shards}
                parts = [part for parts in pieces for part in parts]
                assert {p.untyped_storage().data_ptr() for p in parts} <= storages, (name, tp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_head_shard_normalizes_only_its_rows_bit_exactly(dtype, monkeypatch):
    cfg = ModelConfig(vocab_size=300, hidden_size=16, num_attention_heads=1)
    entry = mapping.NormHead("output_layer.weight", ("lm_head.weight",))
    head = (torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    pieces = entry.split(entry.to_mcore([head], cfg), 4, cfg)
    normalized = []
    real = mapping.normalize_rows
    monkeypatch.setattr(mapping, "normalize_rows", lambda w: normalized.append(w.shape[0]) or real(w))
    for rank, piece in enumerate(pieces):
        assert entry.shard([head], cfg, 4, rank).equal(piece), rank
    assert normalized == [128, 128, 44, 0]  # 300 rows padded to 512: each rank's own rows, never all 300
