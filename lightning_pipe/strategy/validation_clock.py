"""A time-based ``val_check_interval`` (``"00:01:00:00"``, a ``timedelta``) decided alike on every rank.

Lightning decides after each training batch, on each process, whether the interval has passed since the last
validation, by that process's clock. Under a pipeline the ranks reach that point a little apart, so near the
interval's end one rank may validate while the others train on (each waiting for the other: a hang, told as a rank
that left the training epoch alone). The last stage decides instead, as it makes the step's result
(:func:`validation_due`), and every rank sets its own clock's reference so that Lightning's check gives that decision
there too (:func:`agree_on_validation`), moving it by at most a second, only near the interval's end.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["validation_due", "agree_on_validation"]

_MARGIN_S = 1.0  # seconds the reference moves, at most, to keep Lightning's check from deciding otherwise here


def validation_due(module: Any) -> bool | None:
    """Whether a time-based validation is due after this training step, by this rank's clock; None without one."""
    trainer = getattr(module, "_trainer", None)
    interval = getattr(trainer, "_val_check_time_interval", None)
    if interval is None:
        return None
    return time.monotonic() - trainer._last_val_time >= interval


def agree_on_validation(module: Any, due: bool | None) -> None:
    """Make Lightning's own time check after this step say ``due`` (the last stage's decision) on this rank."""
    trainer = getattr(module, "_trainer", None)
    interval = getattr(trainer, "_val_check_time_interval", None)
    if due is None or interval is None:
        return
    now = time.monotonic()
    if due:
        trainer._last_val_time = min(trainer._last_val_time, now - interval - _MARGIN_S)
    else:
        trainer._last_val_time = max(trainer._last_val_time, now - interval + _MARGIN_S)
