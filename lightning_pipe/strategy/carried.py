"""State a step carries from batch to batch with the batch's rows, given back to the model: each micro-batch its rows.

PyTorch's word language model keeps an RNN's hidden state between batches, each row of a batch continuing its own
stream: ``output, self.hidden = self.model(x, self.hidden)`` with ``self.hidden`` detached. On one device each batch's
call gets the whole state, row ``i`` of it going with row ``i`` of the batch. A pipeline calls the model once per
micro-batch, so each call gets its own rows of such a state, along the dim that has the batch's rows (dim 1 of a torch
RNN's ``(layers, rows, size)``), as it gets its rows of the batch. What the step stores back is put together from the
micro-batches' model outputs along their rows (:func:`~lightning_pipe.strategy.step_values.whole_output`), so the
next batch finds one device's state.

A tensor the step passes to the model from the LightningModule's own attributes is taken for such a state where one
of its dims, and only one, has the batch's number of rows. One that has them by chance (a table of as many classes
as the batch has rows) is warned of after the step, since a state is stored anew by every step.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.step_effects import own_attributes

__all__ = ["CarriedRows", "RowWindow"]

_DEPTH = 3  # tuples, lists and dicts in an attribute looked into: an LSTM's (h, c), a list of them per layer


@dataclass(frozen=True)
class RowWindow:
    """The rows ``start:stop`` of a ``total``-row batch that a micro-batch holds."""

    start: int
    stop: int
    total: int


class CarriedRows:
    """Gives each micro-batch's model calls its rows of the states the module carries (:meth:`take`), while a
    :meth:`window` is open; tells after a step which attributes it took rows of but did not store anew."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._window: RowWindow | None = None
        self.taken: dict[str, tuple[tuple[int, ...], int]] = {}  # attribute -> (a tensor's whole shape, its rows' dim)
        self.states: set[str] = set()  # attributes found to be such states (taken, and stored anew by the step)
        self._warned: set[str] = set()

    @contextmanager
    def window(self, start: int, stop: int, total: int) -> Iterator[None]:
        """Model calls within are a micro-batch's, of rows ``start:stop`` of a ``total``-row batch; and the step's
        code reads its rows of each state (a guard ``if self.hidden[0].size(1) != x.size(0): self.hidden = None``
        sees the micro-batch's rows, as one device's sees the batch's), the whole put back after unless the step
        stored another."""
        before, self._window = self._window, RowWindow(start, stop, total)
        bound = self._bind_rows(self._window) if stop - start < total else []
        try:
            yield
        finally:
            self._window = before
            for name, whole, rows in bound:
                if self.module.__dict__.get(name) is rows:
                    self.module.__dict__[name] = whole

    def _bind_rows(self, window: RowWindow) -> list[tuple[str, Any, Any]]:
        bound = []
        for name in sorted(self.states):
            whole = self.module.__dict__.get(name)
            rows = _rows_of(whole, window)
            if rows is not None:
                self.module.__dict__[name] = rows
                bound.append((name, whole, rows))
        return bound

    def take(self, calls: list[Any]) -> list[Any]:
        """``calls`` (each a model call's ``(args, kwargs)``) with each carried state in them cut to the open
        window's rows."""
        window = self._window
        if window is None or window.stop - window.start >= window.total:
            return calls
        held = self._held()
        if not held:
            return calls

        def cut(value: Any, depth: int = 0) -> Any:
            if isinstance(value, torch.Tensor):
                name = held.get(id(value))
                dims = [dim for dim, size in enumerate(value.shape) if size == window.total] if name else []
                if len(dims) != 1:
                    return value
                self.taken[name] = (tuple(value.shape), dims[0])
                return value.narrow(dims[0], window.start, window.stop - window.start)
            if depth >= _DEPTH:
                return value
            if isinstance(value, tuple) and not hasattr(value, "_fields"):
                return tuple(cut(item, depth + 1) for item in value)
            if isinstance(value, list):
                return [cut(item, depth + 1) for item in value]
            if type(value) is dict:
                return {key: cut(item, depth + 1) for key, item in value.items()}
            return value

        return [cut(call) for call in calls]

    def pattern(self) -> tuple:
        """What the module's own attributes hold, by kind (a type; a tensor's dtype and dims, not its sizes): a
        model input taken from them (an RNN's state, None until a hook sets it) may make another capture needed
        while the batch's shapes stay."""
        def kind(value: Any, depth: int) -> Any:
            if isinstance(value, torch.Tensor):
                return (value.dtype, value.dim())
            if depth < _DEPTH and isinstance(value, tuple):
                return tuple(kind(item, depth + 1) for item in value)
            return type(value).__name__

        # and which of them are states, which the step reads a micro-batch's rows of (it may call the model otherwise)
        return (*((name, kind(value, 0)) for name, value in own_attributes(self.module).items()),
                tuple(sorted(self.states)))

    def _held(self) -> dict[int, str]:
        """The tensors the module's own attributes hold (in tuples, lists and dicts too), by id: their attribute."""
        found: dict[int, str] = {}

        def visit(value: Any, name: str, depth: int) -> None:
            if isinstance(value, torch.Tensor):
                if not isinstance(value, nn.Parameter):
                    found.setdefault(id(value), name)
            elif depth < _DEPTH and isinstance(value, (tuple, list)):
                for item in value:
                    visit(item, name, depth + 1)
            elif depth < _DEPTH and type(value) is dict:
                for item in value.values():
                    visit(item, name, depth + 1)

        for name, value in own_attributes(self.module).items():
            visit(value, name, 0)
        return found

    def after_step(self, step: str, stored: dict[str, Any], rows: int) -> None:
        """Learn the states: attributes the step (``stored``: the attributes it set, as every rank learns them, each
        with the value it bound) stores with the batch's ``rows`` along one dim of each tensor (also where no call
        took them yet: a guard that reset the state whenever its rows were not the micro-batch's). Warn of each
        attribute whose rows the step's calls got but that the step did not store anew: a state is; a tensor with
        the batch's rows by chance is not one, and each micro-batch's call got only a part of it."""
        taken, self.taken = self.taken, {}
        whole = RowWindow(0, rows, rows)
        # (a list no call took is outputs collected for an epoch-end hook, self.outs = [out]: not a state)
        self.states |= {name for name, value in stored.items()
                        if name in taken or (type(value) is not list and _rows_of(value, whole) is not None)}
        for name, (shape, dim) in taken.items():
            if name in stored or name in self._warned:
                continue
            self._warned.add(name)
            warnings.warn(
                f"{step} gives the model self.{name}, a tensor of shape {shape} whose dim {dim} has the batch's "
                f"{shape[dim]} rows, so each micro-batch's call got its own rows of it, as a state carried from batch "
                f"to batch with the rows (an RNN's hidden state) is given; but the step did not store it anew, as "
                f"such a state is. If it is no such state (a table with as many entries as the batch has rows, by "
                f"chance), each call got a part of it and this trains otherwise than one device: keep it in the "
                f"model (a buffer), or use another batch size", stacklevel=2)


def _rows_of(value: Any, window: RowWindow, depth: int = 0) -> Any:
    """``value`` (a tensor, or tuples and lists of them) with each tensor cut to the window's rows along its one dim
    of the batch's rows; None where any tensor has no such single dim (not a state of this batch's rows now)."""
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        dims = [dim for dim, size in enumerate(value.shape) if size == window.total]
        return value.narrow(dims[0], window.start, window.stop - window.start) if len(dims) == 1 else None
    if depth < _DEPTH and isinstance(value, (tuple, list)) and not hasattr(value, "_fields") and value:
        parts = [_rows_of(item, window, depth + 1) for item in value]
        return None if any(part is None for part in parts) else type(value)(parts)
    return None
