"""Capturing on the meta device (no weights touched) and rewriting the devices a capture baked into its graphs.

A capture on meta twins must still see the device the graphs will run on: autocast casts only tensors of its own
device type, so a trace whose fake tensors said ``meta`` recorded float32 where ``bf16-mixed`` computes bfloat16 (and
export bakes those dtypes into its graphs as asserts and elided ``.to()`` calls). :func:`faking_device` makes the
fake tensors that export builds from meta twins say the run's device instead, which is what a real tensor's fake says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["META", "has_meta_state", "on_meta", "to_meta", "faking_device", "rewrite_devices"]

META = torch.device("meta")


def has_meta_state(model: nn.Module) -> bool:
    """Whether some parameter or buffer of ``model`` has no storage (built on, or left on, the meta device)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def to_meta(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a meta tensor of its shape and dtype."""
    return pytree.tree_map(lambda v: v.to(META) if isinstance(v, torch.Tensor) else v, tree)


@contextlib.contextmanager
def on_meta(model: nn.Module) -> Iterator[None]:
    """Inside the block, every parameter and buffer of ``model`` is a meta twin (ties kept: one twin per tensor).

    Export reads state only for its shapes, dtypes and names, so a rank can capture a model of which it holds
    only a part (the rest on the meta device), or none, and without touching real weights. The original tensors
    are put back afterwards; the segments register those, by name, never the twins.
    """
    twins: dict[int, torch.Tensor] = {}
    swapped: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    twin = twins.get(id(tensor))
                    if twin is None:
                        twin = tensor.to(META)
                        if is_param:
                            twin = nn.Parameter(twin, requires_grad=tensor.requires_grad)
                        twins[id(tensor)] = twin
                    swapped.append((module, name, is_param, tensor))
                    table[name] = twin
        yield
    finally:
        for module, name, is_param, tensor in swapped:
            (module._parameters if is_param else module._buffers)[name] = tensor


@contextlib.contextmanager
def faking_device(device: torch.device) -> Iterator[None]:
    """Inside the block, a fake tensor made from a meta tensor (export's fake of a meta twin or input) reports
    ``device``, as the fake of a real tensor on ``device`` would: autocast, device checks and the devices baked into
    the graph then follow ``device``. Nothing is allocated; ops still run on meta storage."""
    if device.type == "meta":
        yield
        return
    original = FakeTensor.__dict__["__new__"]
    make = original.__func__ if isinstance(original, staticmethod) else original

    def new(cls: type, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 2 and _is_meta(args[2]):
            args = (*args[:2], device, *args[3:])
        for key in ("device", "fake_device", "_fake_device"):
            if _is_meta(kwargs.get(key)):
                kwargs[key] = device
        return make(cls, *args, **kwargs)

    FakeTensor.__new__ = new  # type: ignore[method-assign]
    try:
        yield
    finally:
        FakeTensor.__new__ = original  # type: ignore[method-assign]


def _is_meta(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


def rewrite_devices(graph_module: fx.GraphModule, old: torch.device, new: torch.device) -> int:
    """Replace every ``old`` device baked into ``graph_module``'s ops by ``new``; returns how many ops changed.

    A capture bakes the device it ran on into ops such as ``arange(..., device=cpu)`` and
    ``aten.to.device(mask, cpu, torch.bool)``, as keyword *and* positional arguments (``torch.distributed.pipelining``
    rewrites keywords only).
    """
    changed = 0

    def swap(value: Any) -> Any:
        if isinstance(value, torch.device) and value == old:
            return new
        if isinstance(value, str) and value == str(old):
            return str(new)
        return value

    for module in graph_module.modules():  # the subgraphs of a no_grad or autocast region too
        if not isinstance(module, fx.GraphModule):
            continue
        before = changed
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            args, kwargs = pytree.tree_map(swap, (node.args, node.kwargs))
            if args != node.args or kwargs != node.kwargs:
                node.args, node.kwargs = args, kwargs
                changed += 1
        if changed != before:
            module.recompile()
    return changed
