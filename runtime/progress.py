"""Progress bars for long loops (gallery builds, calibration, evaluation): on a terminal only."""

from __future__ import annotations


def progress(iterable, total: int, desc: str, show: bool = True, unit: str = "img"):
    """A progress bar on a terminal (none in logs, none when ``show`` is false)."""
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=None)
