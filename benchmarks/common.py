"""What the benchmarks share: spawning N gloo ranks, layers that sleep instead of computing, a markdown table, and
Linux's memory counters.

Not imported from ``tests/``: benchmarks are run by users, tests by CI, and neither should depend on the other.
"""

from __future__ import annotations

import ctypes
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine import launch

__all__ = ["SleepCosts", "SleepLayer", "run_ranks", "markdown_table", "write_json", "status_kib", "reset_peak_rss",
           "return_freed_memory"]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 900.0) -> list[Any]:
    """:func:`lightning_pipe.engine.launch.run_ranks` with a timeout for long benchmark runs."""
    return launch.run_ranks(fn, world_size, *args, timeout=timeout)


# -- sleeping layers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SleepCosts:
    """Seconds a :class:`SleepLayer` sleeps: forward, full backward, and the two halves of a split backward."""

    forward: float
    backward: float
    backward_input: float
    backward_weight: float

    @classmethod
    def of(cls, t_f: float, t_b: float, t_i: float | None = None, t_w: float | None = None) -> SleepCosts:
        """Costs with ``t_i`` and ``t_w`` half of ``t_b`` each unless given."""
        t_i = t_b / 2 if t_i is None else t_i
        t_w = t_b - t_i if t_w is None else t_w
        return cls(t_f, t_b, t_i, t_w)


def _sleep(seconds: float) -> None:
    """``time.sleep``, except that a zero cost costs nothing: ``sleep(0)`` yields the core, ~1 ms on a busy machine."""
    if seconds > 0:
        time.sleep(seconds)


def _will_run(node: Any) -> bool:
    return node is not None and torch._C._will_engine_execute_node(node)


class _Sleep(torch.autograd.Function):
    """``x * w`` that sleeps instead of computing; its backward sleeps for the gradients actually requested.

    ``ctx.needs_input_grad`` cannot tell which gradients a backward pass wants: it is fixed at forward time
    (both True for an input and a weight that require grad, also inside ``autograd.grad(out, [x])``). So the
    backward asks the autograd engine whether it will run the node behind each input; the inputs are views
    made in :meth:`SleepLayer.forward`, because the engine cannot answer that for a leaf during ``autograd.grad``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, costs: SleepCosts) -> torch.Tensor:
        _sleep(costs.forward)  # releases the GIL: the timeline does not depend on the core count
        ctx.save_for_backward(x, weight)
        ctx.costs = costs
        return x * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        costs: SleepCosts = ctx.costs
        input_node, weight_node = ctx.next_functions[0][0], ctx.next_functions[1][0]
        want_input, want_weight = _will_run(input_node), _will_run(weight_node)
        if want_weight and (want_input or input_node is None):
            # A full backward. Without an input that needs a gradient (the first stage) it still costs t_b,
            # as the ideal-time formulas assume every stage's backward does.
            _sleep(costs.backward)
        elif want_input:
            _sleep(costs.backward_input)
        elif want_weight:
            _sleep(costs.backward_weight)
        grad_x = grad * weight if want_input else None
        grad_weight = (grad * x).sum(0) if want_weight else None
        return grad_x, grad_weight, None


class SleepLayer(nn.Module):
    """A layer on rows of ``width`` numbers that sleeps ``costs`` seconds instead of computing, with a parameter.

    Its result is ``x * weight`` (weight starts at ones), so a chain of them passes data through and every
    weight gets a gradient. ``num_parameters`` adds an unused table so that the layer holds that many parameters
    in all (parameter-balanced cuts then see a real model's shape).
    """

    def __init__(self, costs: SleepCosts, width: int = 4, num_parameters: int = 0) -> None:
        super().__init__()
        self.costs = costs
        self.weight = nn.Parameter(torch.ones(width))
        if num_parameters > width:
            self.table = nn.Parameter(torch.zeros(num_parameters - width))

    def extra_repr(self) -> str:  # part of the planner's profile cache key
        table = getattr(self, "table", None)
        return f"costs={self.costs}, parameters={self.weight.numel() + (0 if table is None else table.numel())}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x.view_as(x), self.weight.view_as(self.weight), self.costs)


# -- output -----------------------------------------------------------------------------------------
def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a markdown table of ``columns`` (floats with 3 significant decimals)."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(results: Any, path: str | None) -> None:
    """Write a benchmark's results to ``path`` (its ``--json``), if given."""
    if path:
        with open(path, "w") as file:
            json.dump(results, file, indent=1)


# -- memory counters ------------------------------------------------------------------------------
def status_kib(field: str) -> int:
    """A field of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``...), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the benchmark reads Linux's memory counters)")


def reset_peak_rss() -> None:
    """Reset VmHWM, the peak RSS (Linux >= 4.0; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def return_freed_memory() -> None:
    """Make glibc hand every tensor-sized block back to the OS when freed, so that RSS follows live tensors.

    By default its mmap threshold rises to the largest block freed so far, after which tensors come from the heap
    and stay resident when freed: peak RSS would then also count freed activations.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: RSS is coarser
        pass
