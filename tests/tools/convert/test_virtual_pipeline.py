"""Megatron-LM's interleaved-pipeline legacy layout: ``--vpp`` writes ``model0``, ``model1``, ... per rank
file (chunk c of PP rank p holds virtual stage c x PP + p, layers numbered within the chunk), and every
reader takes it back bit-exactly."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_patches.errors import ConfigError
from tests.tools.convert import megatron_lm, tiny
from tools.convert import commands, mcore_io


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny.save_hf("llama_gqa", tmp_path_factory.mktemp("hf") / "llama_gqa", seed=3)


def test_vpp_release_layout_on_disk_and_round_trips_bit_exactly(hf_dir, tmp_path):
    commands.hf2mcore(hf_dir, tmp_path / "vpp", tp=2, pp=2, vpp=2, quiet=True)
    first = mcore_io.load_rank(tmp_path / "vpp" / "release", 1, 0, 2)
    last = mcore_io.load_rank(tmp_path / "vpp" / "release", 1, 1, 2)
    assert {key for key in first if re.fullmatch(r"model\d*", key)} == {"model0", "model1"}
    assert first["args"].virtual_pipeline_model_parallel_size == 2
    assert "embedding.word_embeddings.weight" in first["model0"]  # virtual stage 0: layer 0
    assert "embedding.word_embeddings.weight" not in first["model1"]  # virtual stage 2: layer 2
    assert "decoder.layers.0.input_layernorm.weight" in first["model1"]
    assert "decoder.layers.1.input_layernorm.weight" not in first["model1"]  # one layer per chunk
    assert "output_layer.weight" in last["model1"] and "output_layer.weight" not in last["model0"]
    assert "decoder.final_layernorm.weight" in last["model1"]
    # layer 2 (rank 0, chunk 1) is the HF model's layer 2, not rank 1's layer 1
    direct = mcore_io.load_rank(_release(hf_dir, tmp_path / "pp4", tp=2, pp=4), 1, 2, 4)["model"]
    for name, tensor in first["model1"].items():
        assert (tensor is None and direct[name] is None) or torch.equal(tensor, direct[name]), name
    commands.mcore2hf(tmp_path / "vpp", tmp_path / "hf", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dir), tiny.hf_tensors(tmp_path / "hf"))
    commands.mcore2mcore(tmp_path / "vpp", tmp_path / "plain", tp=1, pp=1, quiet=True)
    commands.mcore2mcore(tmp_path / "plain", tmp_path / "vpp_again", tp=1, pp=2, vpp=2, quiet=True)
    commands.mcore2hf(tmp_path / "vpp_again", tmp_path / "hf_again", quiet=True)
    tiny.assert_same_tensors(tiny.hf_tensors(hf_dir), tiny.hf_tensors(tmp_path / "hf_again"))


def test_a_megatron_lm_vpp_checkpoint_exports_bit_exactly(hf_dir, tmp_path):
    # Megatron-LM's: TE key names, args with virtual_pipeline_model_parallel_size, no layers-per-stage record
    root = megatron_lm.legacy(hf_dir, tmp_path / "megatron_lm", "llama_gqa", 1, 2, "te", vpp=2)
    state = mcore_io.load_rank(root / "iter_0000010", 0, 1, 2)
    assert "pipeline_layers" not in state and state["args"].virtual_pipeline_model_parallel_size == 2
    commands.mcore2hf(root, tmp_path / "hf", quiet=True)
    want, got = tiny.hf_tensors(hf_dir), tiny.hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # args record only the padded vocabulary: rows past 100 are padding
        assert torch.equal(got[name][: tensor.shape[0]], tensor), name


def _release(hf_dir, out, **target):
    commands.hf2mcore(hf_dir, out, quiet=True, **target)
    return out / "release"


@pytest.mark.parametrize(
    "target, message",
    [
        (dict(pp=1, vpp=2), "needs pipeline_model_parallel_size >= 2"),
        (dict(pp=2, vpp=4), "num_layers (4) is not divisible by PP x VPP (8)"),
        (dict(pp=2, vpp=2, first=1), "cannot be combined with uneven first/last stages"),
    ],
)
def test_impossible_vpp_is_refused_before_writing(hf_dir, tmp_path, target, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        commands.hf2mcore(hf_dir, tmp_path / "out", quiet=True, **target)
    assert not (tmp_path / "out").exists()
