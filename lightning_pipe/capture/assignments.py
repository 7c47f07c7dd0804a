"""What a forward assigns to its modules' attributes, which a captured graph would not do at each run.

- **A buffer given a new tensor** (``self.ema = 0.9 * self.ema + 0.1 * x.mean(0)``): torch's export turns that into
  an in-place copy for the root module's buffers only; a submodule's assignment was dropped, so the graph computed
  the new value and threw it away (the buffer kept its first value at every step, silently). While export runs, such
  an assignment is made an in-place copy into the buffer (which the graph keeps, as it keeps ``self.ema.mul_(0.9)``),
  where the new value has the buffer's shape and dtype; one of another shape or dtype cannot be, and is reported.
- **A plain Python value changed** (a call counter, ``self.calls += 1``, a flag set on the first call): export runs
  the forward once, so the graph keeps what the forward computed from the value at capture, and the attribute is put
  back after it (by torch's export). On one device each step sees the new value. Reported with the place.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

import torch
import torch.nn as nn

from .errors import locate_frame

__all__ = ["Assignments", "assignment_advice"]

_PLAIN = (bool, int, float)


class Assignments:
    """What the forward assigned in each export run (:meth:`watch`): ``refused``, a buffer given a tensor of another
    shape or dtype; ``changed``, plain attributes given a new value. A forward that sets such a value afresh from its
    inputs at each call (Hugging Face's Swin sets its shift to 0 where the image is as small as its window) changes
    nothing when run again from the values it set: :meth:`settle` sets them for a second run, and only a value that
    changes again (a counter) is refused. :meth:`restore` puts the values back as they were before the first run."""

    def __init__(self, model: nn.Module, names: dict[int, str]) -> None:
        self.model, self.names = model, names
        self.mine = {id(module) for module in model.modules()}
        self.refused: list[str] = []
        self.changed: dict[tuple[int, str], tuple[nn.Module, Any, Any, str]] = {}  # -> (module, before, after, place)
        self.settled: dict[tuple[int, str], tuple[nn.Module, Any, Any, str]] | None = None

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Within the block, buffers of the model's submodules assigned a new tensor are copied into in place."""
        self.refused, self.changed = [], {}
        setattr_ = nn.Module.__setattr__
        handle = torch.nn.modules.module.register_module_buffer_registration_hook(self._buffer_assigned)

        def watched(module: nn.Module, name: str, value: Any) -> None:
            if id(module) in self.mine and name != "training" and name in module.__dict__:
                old = module.__dict__[name]
                if type(old) in _PLAIN and type(value) in _PLAIN and old != value:
                    before = self.changed.get((id(module), name), (module, old))[1]
                    place = f"'{_name(self.names, module, name)}' ({before!r} -> {value!r}) in " \
                            f"{locate_frame(_caller(), self.names)}"
                    self.changed[(id(module), name)] = (module, before, value, place)
            setattr_(module, name, value)

        nn.Module.__setattr__ = watched  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]
            handle.remove()

    def settle(self) -> bool:
        """After the first run that changed plain attributes: sets them to the values it gave them, for a second run
        (True); False after the second (its changes are refused)."""
        if self.settled is not None:
            return False
        self.settled = dict(self.changed)
        for (_, name), (module, _, after, _) in self.settled.items():
            module.__dict__[name] = after
        return True

    def restore(self) -> None:
        for (_, name), (module, before, _, _) in (self.settled or {}).items():
            module.__dict__[name] = before

    def problems(self) -> list[str]:
        return self.refused + [place for _, _, _, place in self.changed.values()]

    def _buffer_assigned(self, module: nn.Module, name: str, value: Any) -> Any:
        old = module._buffers.get(name)
        if module is self.model or id(module) not in self.mine or old is None or value is old:
            return None  # torch's export keeps the root's own
        if not isinstance(value, torch.Tensor) or value.shape != old.shape or value.dtype != old.dtype:
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            entry = (f"buffer '{_name(self.names, module, name)}' assigned {got} in place of {tuple(old.shape)} "
                     f"{old.dtype} in {locate_frame(_caller(), self.names)}")
            if entry not in self.refused:
                self.refused.append(entry)
            return None
        with torch.no_grad() if not value.requires_grad else contextlib.nullcontext():
            old.copy_(value)
        return old


def _caller() -> FrameType | None:
    """The frame that made the assignment: the first outside this file and torch's ``Module.__setattr__``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (__file__, torch.nn.modules.module.__file__):
        frame = frame.f_back
    return frame


def _name(names: dict[int, str], module: nn.Module, attribute: str) -> str:
    prefix = names.get(id(module), "")
    return f"{prefix}.{attribute}" if prefix else attribute


def assignment_advice(model_name: str, found: list[str]) -> str:
    """The error for a forward whose assignments a captured graph would not make (``found``)."""
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return (f"{model_name}.forward assigns to its modules what a captured graph cannot assign at each step: "
            f"{found[0]}{more}. Export runs the forward once: the graph keeps what was computed from such a value "
            f"then, where one device sees it change from step to step. Keep per-step state in a buffer "
            f"(self.register_buffer) updated in place or given a tensor of its shape and dtype "
            f"(self.count += 1 on a tensor buffer), compute it in training_step, or keep the layers in one "
            f"nn.Sequential (not captured)")
