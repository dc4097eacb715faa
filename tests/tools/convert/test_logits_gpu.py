"""On a CUDA device (``bench/gpu_check.sh``): converted checkpoints compute the HF model's logits there.

The gloo tests prove the mapping on CPU; this one runs the same conversions through Megatron-Core's
kernels on the GPU (NCCL world of one, local spec, fp32), so a GPU-only difference (SDPA kernel,
device placement of rotary tables) shows up before a real run. Skipped without a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

from tests.tools.convert import tiny
from tests.tools.convert.test_logits import LOGIT_CASES, SEQ, _hf_logits, _tokens
from tools.convert import commands, mcore_io


def _megatron_logits_on_gpu(root: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    parallel.init_distributed()  # one process, NCCL on GPU 0
    cfg = mcore_io.read_model_config(root)
    parallel.initialize(parallel.Layout(1, 1, 1), seed=0, model=cfg)
    try:
        state, _ = mcore_io.load_model_for_rank(root, 0, 0, 1)
        model = build_model_for_this_rank(cfg).cuda().eval()
        model.load_state_dict(state, strict=True)
        cuda_tokens = tokens.cuda()
        positions = torch.arange(SEQ, device="cuda").expand(tokens.shape[0], -1)
        with torch.no_grad():
            return model(cuda_tokens, positions, None).float().cpu()
    finally:
        ps.destroy_model_parallel()


@pytest.mark.gpu
def test_converted_checkpoints_compute_the_hf_logits_on_a_gpu(tmp_path):
    tokens = _tokens()
    try:
        for case in LOGIT_CASES:
            hf_dir = tiny.save_hf(case, tmp_path / case / "hf")
            commands.hf2mcore(str(hf_dir), str(tmp_path / case / "mcore"), quiet=True)
            got = _megatron_logits_on_gpu(str(tmp_path / case / "mcore"), tokens)
            want = _hf_logits(hf_dir, tokens)
            assert (got[..., : want.shape[-1]] - want).abs().max() <= 1e-4, case
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
