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


def _second_document_logits():
    """Logits of a sequence packing two documents, with Megatron's document mask and without,
    before and after the first document's tokens change."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron_patches import parallel
    from megatron_patches.training.model import build_model_for_this_rank

    parallel.initialize(Layout(1, 1, 1), seed=3, model=GQA)
    unfused = build_model_for_this_rank(dataclasses.replace(GQA, attention_backend="unfused"))
    sdpa = build_model_for_this_rank(dataclasses.replace(GQA, attention_backend="sdpa"))
    sdpa.load_state_dict(unfused.state_dict())
    eod, boundary = 0, 9  # document one is tokens 0..9 (EOD last), document two the rest
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(1, GQA.vocab_size, (24,), generator=generator)
    packed[boundary] = eod
    changed = packed.clone()
    changed[:boundary] = torch.randint(1, GQA.vocab_size, (boundary,), generator=generator)
    out = {}
    for name, model in (("unfused", unfused), ("sdpa", sdpa)):
        model.eval()
        for masked in (True, False):
            logits = []
            for tokens in (packed, changed):
                mask, _, positions = _get_ltor_masks_and_position_ids(
                    tokens, eod, True, masked, False, masked
                )
                batch_mask = None if mask is None else mask[None]
                with torch.no_grad():
                    logits.append(model(tokens[None], positions[None], batch_mask)[0, boundary + 1 :])
            out[name, masked] = logits
    return out


def test_document_mask_stops_attention_across_documents_in_both_backends():
    (out,) = run_on_ranks(_second_document_logits, 1)
    for backend in ("unfused", "sdpa"):
        before, after = out[backend, True]
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # document two never sees one
        unmasked_before, unmasked_after = out[backend, False]
        assert (unmasked_after - unmasked_before).abs().max() > 1e-3  # without the mask it does
    torch.testing.assert_close(out["sdpa", True][0], out["unfused", True][0], atol=1e-5, rtol=1e-5)
