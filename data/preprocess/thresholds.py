"""The clean stage's thresholds, typed: defaults, per-channel defaults, and the config's overrides.

``clean.thresholds`` (every channel) and ``clean.channels.<channel>`` (one channel) in the
pipeline config are partial mappings over :class:`Thresholds`. They are read with the loader
every config uses (``megatron_patches.config_io.from_dict``) when the config is loaded, so a
typo stops the run before any stage starts with one line naming the dotted key and a "did you
mean", and a wrong type names the key and the type it expects. A channel's thresholds are, in
order: the defaults, ``clean.thresholds``, the channel's own defaults (:data:`CHANNEL_DEFAULTS`:
code, markdown and math skip prose rules), ``clean.channels.<channel>``. A threshold set to
null is off.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_patches.config_io import from_dict
from megatron_patches.errors import ConfigError

NGRAM_KEYS = ("max_top_ngram", "max_dup_ngram")


@dataclass(frozen=True)
class Thresholds:
    min_chars: int | None = 30
    max_chars: int | None = 500_000
    min_zh_ratio: float | None = None  # Han / non-space characters
    min_en_ratio: float | None = None  # Latin letters / non-space characters
    min_alpha_ratio: float | None = 0.5  # letters of any script / non-space characters
    max_digit_ratio: float | None = 0.3
    max_symbol_ratio: float | None = 0.3  # not letter, digit or space / non-space characters
    max_url_ratio: float | None = 0.3  # characters inside URLs / all characters
    max_dup_line_ratio: float | None = 0.3  # Gopher: duplicate lines / lines
    max_dup_line_char_ratio: float | None = 0.2  # Gopher: characters in duplicate lines
    max_top_ngram: dict[int, float] | None = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram: dict[int, float] | None = field(default_factory=lambda: {5: 0.15, 7: 0.13, 10: 0.10})
    max_blocklist_hits: int | None = 0


_NO_PROSE_RULES = dict(
    min_alpha_ratio=None,
    max_symbol_ratio=None,
    max_dup_line_ratio=None,
    max_dup_line_char_ratio=None,
    max_top_ngram=None,
    max_dup_ngram=None,
)
CHANNEL_DEFAULTS: dict[str, dict] = {
    "code": dict(_NO_PROSE_RULES, min_alpha_ratio=0.25, max_symbol_ratio=0.6, max_digit_ratio=0.5),
    "markdown": dict(_NO_PROSE_RULES, min_alpha_ratio=0.35, max_symbol_ratio=0.45, max_dup_ngram={10: 0.3}),
    "math": dict(_NO_PROSE_RULES, min_alpha_ratio=0.25, max_symbol_ratio=0.5, max_digit_ratio=0.5),
}


def thresholds_from(values: dict[str, Any] | None, where: str, base: Thresholds | None = None) -> Thresholds:
    """``base`` (default: :class:`Thresholds`) with the thresholds ``values`` sets, read as typed.

    Unknown names and wrong types are a ConfigError naming ``where.<name>``.
    """
    values = values or {}
    typed = from_dict(Thresholds, values, f"{where}.")
    overrides = {name: getattr(typed, name) for name in values}
    for name in NGRAM_KEYS:
        if overrides.get(name) is not None:
            overrides[name] = _ngram_limits(overrides[name], f"{where}.{name}")
    for name, value in overrides.items():
        if name not in NGRAM_KEYS and value is not None:
            _check_range(name, value, f"{where}.{name}")
    return dataclasses.replace(base or Thresholds(), **overrides)


def _check_range(name: str, value: float, where: str) -> None:
    """Counts (characters, keyword hits) are >= 0; ratios are fractions in [0, 1]."""
    if name.endswith("_ratio") and not 0 <= value <= 1:
        raise ConfigError(f"{where} must be a fraction in [0, 1] (null: off), got {value!r}")
    if not name.endswith("_ratio") and value < 0:
        raise ConfigError(f"{where} must be >= 0 (null: off), got {value!r}")


def _ngram_limits(value: dict, where: str) -> dict[int, float]:
    """``{n: fraction}``; keys may be strings (JSON, CLI overrides)."""
    try:
        limits = {int(n): float(limit) for n, limit in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must map n to a fraction, got {value!r}") from None
    if any(n < 1 or not 0 <= limit <= 1 for n, limit in limits.items()):
        raise ConfigError(f"{where} must map n >= 1 to a fraction in [0, 1], got {value!r}")
    return limits


def channel_thresholds(overrides: dict, channels: dict) -> tuple[Thresholds, dict[str, Thresholds]]:
    """(every channel's thresholds, {channel: its own}) from ``clean.thresholds`` and ``clean.channels``."""
    if not isinstance(channels or {}, dict):
        raise ConfigError(f"clean.channels must map a channel to its thresholds, got {channels!r}")
    channels = channels or {}
    default = thresholds_from(overrides, "clean.thresholds")
    per_channel = {}
    for channel in sorted(set(CHANNEL_DEFAULTS) | set(channels)):
        base = dataclasses.replace(default, **CHANNEL_DEFAULTS.get(channel, {}))
        own = channels.get(channel)
        if isinstance(own, dict):  # the channel's rule list (`rules`) sits beside its thresholds
            own = {name: value for name, value in own.items() if name != "rules"}
        per_channel[channel] = thresholds_from(own, f"clean.channels.{channel}", base)
    return default, per_channel
