"""Progress reporting for the long steps: a callback that wraps an iterable (rich's bars in the CLI)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

Track = Callable[..., Iterable]


def no_progress(iterable: Iterable, description: str = "", total: int | None = None) -> Iterable:
    """Default progress callback: iterate silently.

    Parameters
    ----------
    iterable : Iterable
        The items of a long step.
    description : str
        What the step does (a progress bar's label); ignored.
    total : int or None
        The number of items, where known; ignored.

    Returns
    -------
    Iterable
        `iterable` itself.
    """
    return iterable
