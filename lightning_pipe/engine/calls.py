"""Several calls of the model per micro-batch: a siamese network's two inputs, SimCLR's two views, a triplet.

A step that calls the pipelined model ``k`` times gives the first stage ``Calls((x_1, ..., x_k))``. Every stage runs
its layers on each call's input in turn, in call order, and hands on ``Calls`` of the outputs; the last stage's step
takes the ``i``-th output at its ``i``-th call. Autograd sees ``k`` forwards of the same weights, so their gradients
add up as they do on one device; the deferred batch norms commit each call's statistics in turn (one device updates
them once per call). One call is passed as it is, not wrapped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Calls", "each_call"]


class Calls(NamedTuple):
    """The inputs (or outputs) of a micro-batch's calls of the model, in call order."""

    each: tuple


def each_call(fn: Callable[[Any], Any], inputs: Any, on_call: Callable[[int], None] | None = None) -> Any:
    """``fn(inputs)``; for :class:`Calls`, ``Calls`` of ``fn`` of each (``on_call(i)`` before the ``i``-th)."""
    if not isinstance(inputs, Calls):
        return fn(inputs)
    outputs = []
    for index, value in enumerate(inputs.each):
        if on_call is not None:
            on_call(index)
        outputs.append(fn(value))
    if on_call is not None:
        on_call(0)
    return Calls(tuple(outputs))
