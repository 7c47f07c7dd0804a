"""Code before the pipelined layers runs once: on the first stage, not again on the last.

The last stage runs a step whole around the pipeline's output, so the step's code before the layers runs there too:
a frozen backbone or a tokenizer-like module in the step would compute on the first stage (whose result the pipeline
carries) and again on the last, where nothing needs it. :class:`DeferredCalls` wraps the LightningModule's direct
children that do not hold the pipelined layers while the last stage runs a step: before the step calls the layers,
a call of such a module returns a :class:`LazyValue`, a tensor that computes the module's real output only if the
step uses it (a distillation loss against the backbone's features, say). Passed to the layers, it is dropped unseen.

A module is deferred only after one real call showed that it returns a plain tensor, draws no random numbers,
changes none of its buffers (BatchNorm in train mode does), stores nothing on itself (RevIN keeps the statistics of
its "norm" call for its "denorm" call after the model) and carries no forward hooks of the user's (a teacher's layer
whose hook stores its features for a distillation loss): otherwise deferring it could change what the step computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.unfollowed import FORWARD_HOOKS, users_hooks

__all__ = ["LazyValue", "DeferredCalls"]


class LazyValue(torch.Tensor):
    """A module's output not computed yet: any use computes it (once) and goes on with the real tensor."""

    _compute: Callable[[], torch.Tensor]
    _value: torch.Tensor | None

    @staticmethod
    def __new__(cls, compute: Callable[[], torch.Tensor]) -> LazyValue:
        lazy = torch.Tensor._make_subclass(cls, torch.empty(0))
        lazy._compute, lazy._value = compute, None
        return lazy

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._compute()
        return self._value

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def real(value: Any) -> Any:
            if isinstance(value, LazyValue):
                return value.materialize()
            if isinstance(value, (list, tuple)):
                return type(value)(real(v) for v in value)
            if isinstance(value, dict):
                return {k: real(v) for k, v in value.items()}
            return value

        with torch._C.DisableTorchFunctionSubclass():
            return func(*real(args), **real(kwargs or {}))

    def __repr__(self) -> str:  # type: ignore[override]
        return repr(self.materialize())


def _bindings(module: nn.Module) -> list[tuple[int, str, int]]:
    """What ``module`` and its submodules hold, by identity: each attribute and buffer. A forward that stores
    something there (RevIN's statistics, kept for its "denorm" call after the model) changes one."""
    found = []
    for part in module.modules():
        found.extend((id(part), key, id(value)) for key, value in part.__dict__.items())
        found.extend((id(part), f"buffer {key}", id(value)) for key, value in part._buffers.items())
    return found


def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule carries forward hooks of the user's: a teacher called only for what a hook
    on one of its layers stores (feature distillation) must run (found by review: deferred, it stored nothing)."""
    return any(users_hooks(part, FORWARD_HOOKS) for part in module.modules())


def _random_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class DeferredCalls:
    """Defers the calls of a LightningModule's children made before the step calls the pipelined layers."""

    def __init__(self, module: nn.Module, holds_layers: Callable[[nn.Module], bool], device: torch.device) -> None:
        from torchmetrics import (
            Metric,  # a metric's update changes its state: never deferred
        )

        self.children = [(name, child) for name, child in module.named_children()
                         if not holds_layers(child) and not issubclass(type(child), Metric)]
        self.device = device
        self.deferrable: dict[str, bool] = {}  # learned from each child's first real call
        self.deferred = 0  # calls deferred so far (for tests and the docs)

    @contextmanager
    def around(self, layers_called: Callable[[], bool]) -> Iterator[None]:
        """While a step runs on the last stage: calls before ``layers_called()`` turns true are deferred."""
        for name, child in self.children:
            child.forward = self._wrap(name, child, child.forward, layers_called)  # type: ignore[method-assign]
        try:
            yield
        finally:
            for _, child in self.children:
                child.__dict__.pop("forward", None)

    def _wrap(self, name: str, child: nn.Module, forward: Callable[..., Any],
              layers_called: Callable[[], bool]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if layers_called() or self.deferrable.get(name) is False or _hooked(child):  # (a hook added later too)
                return forward(*args, **kwargs)
            if name not in self.deferrable:  # the first call runs for real and shows whether deferring is safe
                random, versions = _random_states(self.device), [b._version for b in child.buffers()]
                bindings = _bindings(child)
                output = forward(*args, **kwargs)
                same_draws = all(torch.equal(a, b) for a, b in zip(random, _random_states(self.device)))
                self.deferrable[name] = (type(output) is torch.Tensor and bindings == _bindings(child) and same_draws
                                         and versions == [b._version for b in child.buffers()])
                return output
            self.deferred += 1
            grad, kind = torch.is_grad_enabled(), self.device.type
            autocast = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)

            def compute() -> torch.Tensor:  # as it would have run at the call
                with torch.set_grad_enabled(grad), torch.autocast(kind, dtype=autocast[1], enabled=autocast[0]):
                    return forward(*args, **kwargs)

            return LazyValue(compute)

        return call
