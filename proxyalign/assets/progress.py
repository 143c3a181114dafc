"""Progress output: one status line per step and byte progress bars, all on stderr.

Kept apart so every step reports the same way and a script's stdout stays clean; tqdm is imported only
when a line or bar is actually made.
"""

from __future__ import annotations

import sys
from typing import Any


def _say(progress: bool, message: str) -> None:
    """One status line per step, on stderr so a script's stdout stays clean."""
    if progress:
        from tqdm import tqdm

        tqdm.write(f"[proxyalign] {message}", file=sys.stderr)


def _byte_bar(progress: bool, total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )
