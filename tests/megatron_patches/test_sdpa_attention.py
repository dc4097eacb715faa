"""The SDPA core attention computes what Megatron-Core's DotProductAttention computes."""

import dataclasses

import torch

from megatron_patches.parallel import Layout
from tests.dist import run_on_ranks
from tests.megatron_patches.test_parallel import TINY as GQA


def _compare(tp: int):
    from megatron_patches import parallel
    from megatron_patches.sdpa_attention import SDPAttention
    from megatron_patches.training.model import build_model_for_this_rank

    world = torch.distributed.get_world_size()
    parallel.initialize(Layout(world, tp, 1), seed=3, model=GQA)
    unfused = build_model_for_this_rank(dataclasses.replace(GQA, attention_backend="unfused"))
    sdpa = build_model_for_this_rank(dataclasses.replace(GQA, attention_backend="sdpa"))
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert not isinstance(unfused.decoder.layers[0].self_attention.core_attention, SDPAttention)
    sdpa.load_state_dict(unfused.state_dict())
    tokens = torch.randint(0, GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, -1)
    results = []
    for model in (unfused, sdpa):
        losses = model(tokens, positions, None, labels=tokens.roll(-1, dims=1))
        losses.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((losses.detach(), grads))
    return results


def test_sdpa_matches_unfused_attention_forward_and_backward_under_tp_and_gqa():
    for (ref_loss, ref_grad), (loss, grad) in run_on_ranks(_compare, 2, 2):
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
        assert ref_grad.abs().sum() > 0
