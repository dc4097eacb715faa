"""Megatron-LM's own checkpoints (legacy and torch_dist, with ``args``, no ``model_config``) convert.

The fixtures (``megatron_lm.py``) lay the tiny HF model's weights out as
Megatron-LM's ``save_checkpoint`` does; the exported HF model must compute the
source model's logits. Missing architecture is refused naming ``--model-config``;
a planted pickle in ``args`` is refused without running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import transformers

from megatron_patches.errors import ConfigError
from megatron_patches.formats import checkpoint as ckpt_format
from megatron_patches.formats.megatron_lm_args import model_config_from_args
from tests.megatron_patches.test_safe_load import Planted
from tests.tools.convert import megatron_lm, tiny
from tools.convert import commands

TOKENS = torch.randint(0, megatron_lm.HF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _assert_same_model(hf_dir: Path, export: Path) -> None:
    """The export's logits over the tokenizer's vocabulary (its padding rows aside) are the source's."""
    want, got = _logits(hf_dir), _logits(export)
    assert got.shape[-1] >= want.shape[-1]
    torch.testing.assert_close(got[..., : want.shape[-1]], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("case", "spec", "tp", "pp"),
    [("llama_gqa", "local", 2, 2), ("llama_gqa", "te", 2, 2), ("llama_mha_tied", "te", 1, 1)],
)
def test_mcore2hf_of_a_megatron_lm_legacy_checkpoint_computes_the_same_logits(tmp_path, case, spec, tp, pp):
    hf_dir = tiny.save_hf(case, tmp_path / "hf", seed=1)
    root = megatron_lm.legacy(hf_dir, tmp_path / "megatron_lm", case, tp, pp, spec)

    commands.mcore2hf(str(root), str(tmp_path / "export"), quiet=True)

    _assert_same_model(hf_dir, tmp_path / "export")


def test_mcore2hf_and_mcore2mcore_of_a_megatron_lm_torch_dist_checkpoint(tmp_path):
    hf_dir = tiny.save_hf("llama_gqa", tmp_path / "hf", seed=2)
    root = megatron_lm.torch_dist(hf_dir, tmp_path / "megatron_lm", "llama_gqa")

    commands.mcore2hf(str(root), str(tmp_path / "export"), quiet=True)
    _assert_same_model(hf_dir, tmp_path / "export")
    commands.mcore2mcore(str(root), str(tmp_path / "tp2"), tp=2, quiet=True)
    commands.mcore2hf(str(tmp_path / "tp2"), str(tmp_path / "export2"), quiet=True)
    _assert_same_model(hf_dir, tmp_path / "export2")


def test_a_checkpoint_without_args_needs_model_config_which_takes_a_megatron_lm_argument_list(tmp_path):
    hf_dir = tiny.save_hf("llama_gqa", tmp_path / "hf", seed=3)
    root = megatron_lm.legacy(hf_dir, tmp_path / "megatron_lm", "llama_gqa", 2, 1, "local", with_args=False)
    with pytest.raises(ConfigError) as err:
        commands.mcore2hf(str(root), str(tmp_path / "export"), quiet=True)
    assert "records neither model_config nor Megatron-LM args" in str(err.value)
    assert "--model-config FILE" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "export").exists()

    arguments = tmp_path / "gpt_args.txt"
    arguments.write_text(
        "--num-layers 4 --hidden-size 64 --ffn-hidden-size 96 --num-attention-heads 8 \\\n"
        "--group-query-attention --num-query-groups 4 --swiglu --normalization RMSNorm \\\n"
        "--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear \\\n"
        "--vocab-size 256  # padded for TP 2\n"
    )
    commands.mcore2hf(str(root), str(tmp_path / "export"), model_config=str(arguments), quiet=True)
    _assert_same_model(hf_dir, tmp_path / "export")


def test_hf2mcore_releases_carry_args_that_describe_the_model_for_megatron_lm(tmp_path):
    hf_dir = tiny.save_hf("llama_gqa", tmp_path / "hf")
    commands.hf2mcore(str(hf_dir), str(tmp_path / "mcore"), tp=2, pp=2, quiet=True)
    commands.hf2mcore(str(hf_dir), str(tmp_path / "dist"), fmt="torch_dist", quiet=True)

    rank = torch.load(ckpt_format.rank_file(tmp_path / "mcore" / "release", 1, 1, 2), weights_only=False)
    args = rank["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert (args.padded_vocab_size, args.num_query_groups, args.group_query_attention) == (256, 4, True)
    assert rank["model"]["output_layer.weight"].shape[0] * 2 == args.padded_vocab_size
    stored = ckpt_format.model_config_of(rank, "rank file")
    derived = model_config_from_args(args, "rank file")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "groups", "head_dim", "swiglu"):
        assert getattr(derived, name) == getattr(stored, name), name
    common = torch.load(tmp_path / "dist" / "release" / "common.pt", weights_only=False)
    assert common["args"].padded_vocab_size == 128 and common["args"].normalization == "RMSNorm"


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_a_planted_pickle_in_megatron_lm_args_is_refused_without_running(tmp_path, fmt):
    hf_dir = tiny.save_hf("llama_gqa", tmp_path / "hf")
    marker = tmp_path / "pwned"
    if fmt == "torch":
        root = megatron_lm.legacy(hf_dir, tmp_path / "megatron_lm", "llama_gqa", 1, 1, "local")
        planted = ckpt_format.rank_file(root / "iter_0000010", 0, 0, 1)
    else:
        root = megatron_lm.torch_dist(hf_dir, tmp_path / "megatron_lm", "llama_gqa")
        planted = root / "iter_0000010" / "common.pt"
    megatron_lm.plant(planted, "args", argparse.Namespace(num_layers=4, evil=Planted(marker)))

    for convert in (commands.mcore2hf, commands.mcore2mcore):
        with pytest.raises(ConfigError) as err:
            convert(str(root), str(tmp_path / "out"), quiet=True)
        assert f"cannot read {planted}: it pickles posix.system" in str(err.value)
        assert not marker.exists() and not (tmp_path / "out").exists()
