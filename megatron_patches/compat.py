"""Guard against Megatron-Core drift: patches wrap functions of the pinned release.

Each patch module calls :func:`require_signature` at import time for every
Megatron-Core callable it wraps or calls with keyword arguments. If a user
installs another Megatron-Core, the import fails with one line naming the
function and the parameters that changed, instead of a wrong result later.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

PINNED_MEGATRON_CORE = "0.16.1"


class MegatronVersionError(ImportError):
    """The installed Megatron-Core is not the one this project's patches were written for."""


def installed_megatron_core() -> str:
    from megatron.core import package_info

    return package_info.__version__


def require_signature(func: Callable, expected: Iterable[str]) -> None:
    """Fail unless ``func``'s leading parameters are exactly ``expected``, in order."""
    expected = list(expected)
    actual = list(inspect.signature(func).parameters)[: len(expected)]
    if actual != expected:
        name = f"{func.__module__}.{func.__qualname__}"
        raise MegatronVersionError(
            f"{name} has parameters {actual}, expected {expected} "
            f"(written for megatron-core=={PINNED_MEGATRON_CORE}, "
            f"installed {installed_megatron_core()}); install megatron-core=={PINNED_MEGATRON_CORE}"
        )
