"""What a long job prints: progress bars only for a person at a terminal, one line per epoch otherwise.

tqdm redraws its bar with carriage returns; in a log file (dvc repro, Prefect, CI) every redraw becomes a line
(about 66 KB per experiment). So bars are drawn only when stderr, where tqdm writes, is a terminal and the command
is not quiet. `action3d --quiet` (or ACTION3D_QUIET=1) also silences the per-epoch lines; errors and a stage's
final JSON line are always printed. Pure Python: the engine and the data modules may import it.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

_quiet = os.environ.get("ACTION3D_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def set_quiet(quiet: bool = True) -> None:
    """Silence bars and progress lines in this process (the CLI's --quiet)."""
    global _quiet
    _quiet = bool(quiet)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def show_bars(progress: bool = True, stream: TextIO | None = None) -> bool:
    """Whether to draw a progress bar: asked for, not quiet, and `stream` (default stderr) is a terminal."""
    return bool(progress) and not _quiet and _isatty(sys.stderr if stream is None else stream)


def say(*args: Any, **kwargs: Any) -> None:
    """print (flushed) unless quiet: one progress line, such as an epoch's metrics."""
    if not _quiet:
        print(*args, flush=True, **kwargs)
