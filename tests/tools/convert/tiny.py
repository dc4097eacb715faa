"""Tiny random HF checkpoints of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

BASE = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# name -> (transformers model_type, config overrides)
CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=4)),
    "llama_mha_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama31": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=LLAMA31_ROPE,
            max_position_embeddings=131072,
        ),
    ),
    "yi": ("llama", dict(num_key_value_heads=2, rope_theta=5000000.0, vocab_size=130)),
    "deepseek_dense": ("llama", dict(vocab_size=102, rms_norm_eps=1e-6)),
    # DeepSeek-Coder: linear rope scaling, factor 4
    "deepseek_coder": (
        "llama",
        dict(rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}, rms_norm_eps=1e-6),
    ),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
    "mistral_mha_tied": ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(num_key_value_heads=4, rope_theta=1000000.0)),
    "qwen2_tied_mha": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(num_key_value_heads=4, head_dim=16)),
    "qwen3_tied_mha": ("qwen3", dict(head_dim=4, tie_word_embeddings=True)),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (8, 1)]
# Mixture-of-Experts families at odd shapes: experts not a power of two, top-3, vocabulary 100.
MOE_CASES = {
    "mixtral": ("mixtral", dict(num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=2)),
    # 12 experts (EP 1, 2, 4), a dense first layer, softmax over all experts then top-3 (no renormalization)
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            num_experts=12,
            num_experts_per_tok=3,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=56,
            mlp_only_layers=[0],
            norm_topk_prob=False,
            num_key_value_heads=4,
        ),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            head_dim=16,
            num_key_value_heads=4,
        ),
    ),
}

# DeepSeek (Multi-Latent Attention) at odd shapes: v_head_dim != qk_head_dim, 6 routed experts in 3 groups,
# 2 shared experts, a dense first layer; V2-Lite without query compression, with YaRN.
MLA = dict(kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, rms_norm_eps=1e-6)
DS_MOE = dict(moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1, num_hidden_layers=3)
YARN = dict(
    rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707
)
DEEPSEEK_CASES = {
    "deepseek_v2_lite": (
        "deepseek_v2",
        dict(**MLA, **DS_MOE, q_lora_rank=None, n_routed_experts=6, num_experts_per_tok=3, rope_scaling=YARN),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            **MLA,
            **DS_MOE,
            q_lora_rank=24,
            n_routed_experts=6,
            num_experts_per_tok=4,
            n_group=3,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random and O(1)-active, so biases and norms matter and attention is not uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("bias"):
                param.copy_(0.3 * noise)
            elif param.dim() == 1:  # norm weights
                param.copy_(1 + 0.2 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(1.5 * noise / math.sqrt(param.shape[1]))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's routing bias: let it change choices
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
    return model


def hf_model(case: str, seed: int = 0):
    model_type, overrides = {**CASES, **MOE_CASES, **DEEPSEEK_CASES}[case]
    config = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    config._attn_implementation = "eager"
    return randomize(transformers.AutoModelForCausalLM.from_config(config), seed).eval()


def save_hf(case: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    model = hf_model(case, seed).to(dtype)
    model.save_pretrained(directory)
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    return Path(directory)


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def save_baichuan_pair(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A Baichuan2-7B-style checkpoint (W_pack, unnormalized NormHead) and the Llama it equals."""
    llama = hf_model("deepseek_dense", seed)  # MHA, untied: Baichuan2-7B's shape of model
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    state["lm_head.weight"] = torch.nn.functional.normalize(state["lm_head.weight"], dim=1)
    llama.load_state_dict(state)
    llama.save_pretrained(directory / "llama")

    scales = (
        torch.rand(state["lm_head.weight"].shape[0], 1, generator=torch.Generator().manual_seed(seed)) + 0.5
    )
    baichuan = {"lm_head.weight": state.pop("lm_head.weight") * scales}
    for layer in range(BASE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        parts = [state.pop(f"{prefix}{p}_proj.weight") for p in "qkv"]
        baichuan[f"{prefix}W_pack.weight"] = torch.cat(parts)
    baichuan.update(state)
    out = directory / "baichuan2"
    out.mkdir()
    save_file(
        {k: v.contiguous() for k, v in baichuan.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    config = {
        "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "model_type": "baichuan",
        "hidden_act": "silu",
        "hidden_size": BASE["hidden_size"],
        "intermediate_size": BASE["intermediate_size"],
        "num_attention_heads": BASE["num_attention_heads"],
        "num_hidden_layers": BASE["num_hidden_layers"],
        "vocab_size": 102,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "z_loss_weight": 0,
    }
    (out / "config.json").write_text(json.dumps(config))
    (out / "modeling_baichuan.py").write_text("# remote code travels with the checkpoint\n")
    return out, directory / "llama"
