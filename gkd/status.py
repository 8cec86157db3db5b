"""A transient status line on stderr for work that takes seconds, such as tracing a model the first time.

Shown only when stderr is a terminal: pipes, log files and tests see nothing extra, so an error stays the one
line on stderr that gkd promises. The line disappears when the work is done.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Show `message` with a spinner on a terminal's stderr while the block runs."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield
