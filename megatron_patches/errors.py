"""One error type for bad input, and the CLI wrapper that turns it into one line.

Every command of this project (train, convert, preprocess) validates its input
before it builds or writes anything and raises :class:`ConfigError` with a
message naming the offending value. :func:`run_cli` prints that message as a
single ``error:`` line and exits with status 2, never a stack dump.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """Input the user can fix: a config value, a path, a layout, a file's content."""


def run_cli(main: Callable[[], int | None], prog: str) -> None:
    try:
        code = main()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
