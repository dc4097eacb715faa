"""torch_dist conversions stream: one layer's tensors in memory, never the whole model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.convert import write_synthetic
from megatron_patches import safe_load
from megatron_patches.formats.model_config import ModelConfig
from tests.tools.convert import tiny
from tools.convert import commands, layout, mcore_io

REPO = Path(__file__).resolve().parents[3]
MIB = 1 << 20
# Peak RSS of a conversion is the runtime's, plus what it holds; the latter is what is measured
# (VmHWM: ru_maxrss would report this test process's own peak, inherited through fork and exec).
_CONVERT_AND_REPORT_PEAK = """
import sys
from tools.convert import commands
from tools.convert.progress import peak_rss_bytes
command, src, out = sys.argv[1:4]
if command == "hf2mcore":
    commands.hf2mcore(src, out, fmt="torch_dist", quiet=True)
else:
    commands.mcore2hf(src, out, quiet=True)
print(peak_rss_bytes())
"""


def _peak_rss(command: str, src: Path, out: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT_AND_REPORT_PEAK, command, str(src), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def _config(layers: int, hidden: int, ffn: int, heads: int, vocab: int) -> ModelConfig:
    return ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        vocab_size=vocab,
    )


def _bytes(cfg: ModelConfig, names: list[str]) -> int:
    shapes = layout.canonical_shapes(cfg)
    return sum(torch.Size(shapes[name]).numel() * 2 for name in names)  # bf16


@pytest.mark.slow
def test_torch_dist_conversions_hold_one_layer_and_one_large_tensor(tmp_path):
    """A 540 MB model converts HF -> torch_dist -> HF with peak RSS over the runtime's below one layer +
    the largest tensor (+ allocator slack): the whole-model path held all 540 MB."""
    tiny_cfg, big = _config(1, 64, 128, 4, 256), _config(4, 2048, 5632, 16, 16000)
    write_synthetic(tiny_cfg, tmp_path / "tiny_hf")
    write_synthetic(big, tmp_path / "big_hf")
    layer = _bytes(big, [n for n in layout.canonical_shapes(big) if n.startswith("decoder.layers.0.")])
    largest = _bytes(big, [layout.EMBEDDING])
    # Slack: the reader's transient copy of the tensor being read (torch.load's, before it lands in
    # place) and allocator growth; far below the 540 MB the whole-model path held.
    bound = layer + largest + 160 * MIB
    for command, src, out in (("hf2mcore", "hf", "dist"), ("mcore2hf", "dist", "back")):
        runtime = _peak_rss(command, tmp_path / f"tiny_{src}", tmp_path / f"tiny_{out}")
        peak = _peak_rss(command, tmp_path / f"big_{src}", tmp_path / f"big_{out}")
        assert peak - runtime <= bound, (command, (peak - runtime) // MIB, bound // MIB)
    tiny.assert_same_tensors(tiny.hf_tensors(tmp_path / "big_hf"), tiny.hf_tensors(tmp_path / "big_back"))


def test_layers_are_stored_stacked_as_megatron_core_does_and_read_back_one_by_one(tmp_path):
    hf = tiny.save_hf("qwen3", tmp_path / "hf", seed=4)
    commands.hf2mcore(hf, tmp_path / "dist", fmt="torch_dist", dtype="bf16", quiet=True)
    metadata = safe_load.verify_torch_dist(tmp_path / "dist" / "release").metadata.state_dict_metadata
    qkv = metadata["decoder.layers.self_attention.linear_qkv.weight"]
    assert tuple(qkv.size) == (4, 256, 64) and qkv.properties.dtype == torch.bfloat16
    assert [tuple(c.offsets) for c in qkv.chunks] == [(layer, 0, 0) for layer in range(4)]
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_3_4" in metadata
    commands.mcore2hf(tmp_path / "dist", tmp_path / "back", quiet=True)
    expected = {name: t.to(torch.bfloat16) for name, t in tiny.hf_tensors(hf).items()}
    tiny.assert_same_tensors(expected, tiny.hf_tensors(tmp_path / "back"))


def _mapped_file(address: int) -> str | None:
    """The file this process has mapped at ``address`` (``/proc/self/maps``), None for anonymous memory."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        begin, end = (int(bound, 16) for bound in fields[0].split("-"))
        if begin <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


def test_a_stored_layer_is_read_as_a_view_of_its_mapped_file_not_copied(tmp_path):
    """torch.distributed.checkpoint's reader copies every byte twice (read into memory, copy into the
    destination); the converter reads a stored chunk as the pages of its ``.distcp`` file."""
    hf = tiny.save_hf("qwen3", tmp_path / "hf", seed=4)
    commands.hf2mcore(hf, tmp_path / "dist", fmt="torch_dist", dtype="bf16", quiet=True)
    iter_dir = tmp_path / "dist" / "release"
    reader, _, _ = mcore_io.open_torch_dist(iter_dir)
    read = reader.read("decoder.layers.2.self_attention.linear_qkv.weight")
    assert _mapped_file(read.data_ptr()).endswith(".distcp")
    copied = torch.empty(1, *read.shape, dtype=torch.bfloat16)
    safe_load.read_region(iter_dir, "decoder.layers.self_attention.linear_qkv.weight", (2, 0, 0), copied)
    assert read.equal(copied[0])
