"""A time-based ``val_check_interval`` (``"00:01:00:00"``, a ``timedelta``) decided alike on every rank.

Lightning decides after each training batch, on each process, whether the interval has passed since the last
validation, by that process's clock. Under a pipeline the ranks reach that point a little apart, so near the
interval's end one rank may validate while the others train on (each waiting for the other: a hang, told as a rank
that left the training epoch alone). The last stage decides instead, as it makes the step's result
(:func:`validation_due`), and every rank sets Lightning's reference so that its check gives that decision there too
(:func:`agree_on_validation`): long past where it is due, now where it is not; the true reference is kept aside, so
that the next decision reads it (moved for good, the reference of a step shorter than the second it was moved by
stayed short of the interval for ever: found by review, no validation at all).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["validation_due", "agree_on_validation"]

_LONG_AGO_S = 86400.0  # how long ago a due validation's reference is shown to have been
_KEPT = "_pipeline_validation_reference"  # on the trainer: (the reference shown to Lightning, the true one)


def validation_due(module: Any) -> bool | None:
    """Whether a time-based validation is due after this training step, by this rank's clock; None without one."""
    trainer = getattr(module, "_trainer", None)
    interval = getattr(trainer, "_val_check_time_interval", None)
    if interval is None:
        return None
    return time.monotonic() - _reference(trainer) >= interval


def agree_on_validation(module: Any, due: bool | None) -> None:
    """Make Lightning's own time check after this step say ``due`` (the last stage's decision) on this rank."""
    trainer = getattr(module, "_trainer", None)
    interval = getattr(trainer, "_val_check_time_interval", None)
    if due is None or interval is None:
        return
    now, reference = time.monotonic(), _reference(trainer)
    # due: long past; not due: now (whatever time the rest of the step takes before Lightning's check, it says so)
    shown = now - interval - _LONG_AGO_S if due else now
    trainer._last_val_time = shown
    trainer.__dict__[_KEPT] = (shown, reference)


def _reference(trainer: Any) -> float:
    """The time of the last validation (or of training's start): Lightning's, unless it still holds the value
    :func:`agree_on_validation` showed it (then the one kept aside; a validation since sets Lightning's anew)."""
    kept = trainer.__dict__.get(_KEPT)
    if kept is not None and trainer._last_val_time == kept[0]:
        return kept[1]
    return trainer._last_val_time
