"""Which prefixes the trainer reads, with which weights: the pipeline's side of `blend.yaml`.

Weights come from the configured channel ratios (zh_web: 4, en_web: 4, code: 2 -> 0.4/0.4/0.2),
normalized to sum to 1, or, without ratios, from the token counts (the natural mixture). The files
themselves (blend.yaml, data_path.txt, reading them back) are `megatron_patches.formats.blend`.
"""

from __future__ import annotations

from pathlib import Path

from megatron_patches.errors import ConfigError
from megatron_patches.formats.blend import TokenizerFacts, blend_document, write_blend_files


def blend_weights(tokens: dict[str, int], ratios: dict | None) -> dict[str, float]:
    """Normalized weight per channel; channels with ratio 0 are left out."""
    present = {c for c, n in tokens.items() if n > 0}
    if ratios is None:
        total = sum(tokens[c] for c in present)
        return {c: tokens[c] / total for c in sorted(present)} if total else {}
    missing = sorted(present - set(ratios))
    if missing:
        raise ConfigError(f"blend.ratios has no ratio for channel(s) {missing} (give 0 to leave one out)")
    absent = sorted(c for c, r in ratios.items() if r and c not in present)
    if absent:
        raise ConfigError(f"blend.ratios names channel(s) {absent} but no document was labelled so")
    if any(not isinstance(r, int | float) or r < 0 for r in ratios.values()):
        raise ConfigError(f"blend.ratios must be non-negative numbers, got {ratios}")
    total = float(sum(ratios[c] for c in present))
    if total <= 0:
        raise ConfigError("blend.ratios: at least one channel with data needs a positive ratio")
    return {c: ratios[c] / total for c in sorted(present) if ratios[c] > 0}


def write_blend(
    directory: Path,
    final_dir: Path,
    documents: dict[str, int],
    tokens: dict[str, int],
    ratios: dict | None,
    tokenizer: TokenizerFacts,
) -> dict:
    """Write blend.yaml and data_path.txt into `directory` (which becomes `final_dir`)."""
    blend = blend_document(final_dir, blend_weights(tokens, ratios), documents, tokens, tokenizer)
    write_blend_files(directory, final_dir, blend)
    return blend
