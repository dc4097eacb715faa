"""Bad input fails with one clear line, before or without leaving any output that looks complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_patches.errors import ConfigError
from tests.tools.convert import tiny
from tools.convert import commands, mcore_io

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny.save_hf("llama_gqa", tmp_path_factory.mktemp("src") / "llama")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def _fails(message: str, call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        call(*args, quiet=True, **kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text
    return text


def _nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir() if p.name.startswith(("out", ".out"))] == []


def test_truncated_safetensors(llama, tmp_path):
    hf = _copy(llama, tmp_path / "hf")
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _fails("model.safetensors is truncated: tensor", commands.hf2mcore, hf, tmp_path / "out", tp=2)
    _nothing_written(tmp_path)


def test_missing_shard(llama, tmp_path):
    commands.hf2mcore(llama, tmp_path / "mcore", quiet=True)
    commands.mcore2hf(tmp_path / "mcore", tmp_path / "sharded", max_shard_bytes=50_000, quiet=True)
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    _fails(f"missing shard {shard}", commands.hf2mcore, tmp_path / "sharded", tmp_path / "out")
    _nothing_written(tmp_path)


def test_config_weight_shape_mismatch(llama, tmp_path):
    hf = _copy(llama, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    _fails(
        "model.layers.0.mlp.gate_proj.weight has shape [96, 64] in the checkpoint "
        "but config.json implies [128, 64]",
        commands.hf2mcore, hf, tmp_path / "out",
    )  # fmt: skip
    _nothing_written(tmp_path)


def test_existing_output_is_refused_unless_forced(llama, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _fails(
        f"output {tmp_path / 'out'} already exists; pass --force", commands.hf2mcore, llama, tmp_path / "out"
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    commands.hf2mcore(llama, tmp_path / "out", force=True, quiet=True)
    assert (
        mcore_io.read_tracker(tmp_path / "out") == "release" and not (tmp_path / "out" / "keep.txt").exists()
    )


def test_unsupported_architecture_and_impossible_layouts(llama, tmp_path):
    hf = _copy(llama, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    _fails(
        "num_attention_heads (8) is not divisible by TP (3)", commands.hf2mcore, hf, tmp_path / "out", tp=3
    )
    _fails("num_query_groups (4) is not divisible by TP (8)", commands.hf2mcore, hf, tmp_path / "out", tp=8)
    _fails("num_layers (4) is not divisible by PP (3)", commands.hf2mcore, hf, tmp_path / "out", pp=3)
    (hf / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    _fails("unsupported architecture ['GPT2LMHeadModel']", commands.hf2mcore, hf, tmp_path / "out")
    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    _fails("rope scaling type 'yarn' is not supported", commands.hf2mcore, hf, tmp_path / "out")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "rope_theta": 5e5}
    (hf / "config.json").write_text(json.dumps({**config, "rope_parameters": llama3}))
    _fails("Megatron-Core 0.16.1 hard-codes low_freq_factor=1", commands.hf2mcore, hf, tmp_path / "out")
    _nothing_written(tmp_path)


def test_nonzero_output_projection_bias_is_refused(tmp_path):
    hf = tiny.save_hf("qwen2", tmp_path / "qwen2")
    commands.hf2hf(hf, tmp_path / "llama", to="llama", quiet=True)
    weights = tiny.hf_tensors(tmp_path / "llama")
    weights["model.layers.2.self_attn.o_proj.bias"][0] = 1.0
    save_file(weights, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    _fails(
        "model.layers.2.self_attn.o_proj.bias is not zero",
        commands.hf2mcore,
        tmp_path / "llama",
        tmp_path / "out",
    )


def test_incomplete_megatron_checkpoint(llama, tmp_path):
    commands.hf2mcore(llama, tmp_path / "mcore", tp=2, pp=2, quiet=True)
    (mcore_io.rank_file(tmp_path / "mcore" / "release", 1, 1, 2)).unlink()
    _fails("incomplete checkpoint:", commands.mcore2hf, tmp_path / "mcore", tmp_path / "out")
    _nothing_written(tmp_path)


def test_failure_mid_write_leaves_no_output(llama, tmp_path, monkeypatch):
    calls = []

    def fail_on_third_rank(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    real_save = mcore_io.save_rank
    monkeypatch.setattr(mcore_io, "save_rank", fail_on_third_rank)
    with pytest.raises(OSError, match="disk full"):
        commands.hf2mcore(llama, tmp_path / "out", tp=2, pp=2, quiet=True)
    _nothing_written(tmp_path)


def test_cli_prints_one_error_line(llama, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tools.convert", "hf2mcore", "--hf", str(llama), "--out", str(tmp_path / "o")]
        + ["--tp", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "python -m tools.convert: error: num_attention_heads (8) is not divisible by TP (3)"
    ]
    assert not (tmp_path / "o").exists()


def test_torch_load_refuses_pickled_code(tmp_path):
    """Rank files are read with weights_only: a checkpoint cannot run code on load."""
    root = tmp_path / "ckpt"
    path = mcore_io.rank_file(root / "release", 0, 0, 1)
    path.parent.mkdir(parents=True)
    torch.save({"model": {}, "payload": subprocess.CompletedProcess(["x"], 0)}, path)
    (root / mcore_io.TRACKER_FILE).write_text("release")
    _fails("which no checkpoint holds", commands.mcore2hf, root, tmp_path / "out")


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_baichuan1_and_tied_baichuan2_are_refused(tmp_path):
    """Baichuan-1 has a plain lm_head: converting it as Baichuan2 would normalize its rows."""
    baichuan, _ = tiny.save_baichuan_pair(tmp_path / "src")
    _edit_config(baichuan, architectures=["BaiChuanForCausalLM"])
    _fails("Baichuan-1 (BaiChuanForCausalLM) is not supported", commands.hf2mcore, baichuan, tmp_path / "out")
    _edit_config(baichuan, architectures=[])
    _fails("model_type 'baichuan' without architectures", commands.hf2mcore, baichuan, tmp_path / "out")
    _edit_config(baichuan, architectures=["BaichuanForCausalLM"], tie_word_embeddings=True)
    _fails("Baichuan2 model with tied embeddings", commands.hf2mcore, baichuan, tmp_path / "out")
    _nothing_written(tmp_path)


def test_tied_model_is_not_exported_as_baichuan2(tmp_path):
    tied = tiny.save_hf("llama_mha_tied", tmp_path / "tied")
    _fails("Baichuan2 model with tied embeddings", commands.hf2hf, tied, tmp_path / "out", to="baichuan2")
    commands.hf2mcore(tied, tmp_path / "mcore", quiet=True)
    _fails(
        "Baichuan2 model with tied embeddings",
        commands.mcore2hf, tmp_path / "mcore", tmp_path / "out", family="baichuan2",
    )  # fmt: skip
    _nothing_written(tmp_path)


@pytest.mark.parametrize(("case", "family"), [("qwen2", "Qwen2"), ("qwen3", "Qwen3")])
def test_qwen_sliding_window_is_refused(case, family, tmp_path):
    hf = tiny.save_hf(case, tmp_path / "hf")
    _edit_config(hf, use_sliding_window=True, sliding_window=16)
    _fails(f"{family} use_sliding_window=true is not supported", commands.hf2mcore, hf, tmp_path / "out")
    _nothing_written(tmp_path)
