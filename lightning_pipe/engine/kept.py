"""What a look at a module (a run only to measure or compare: a profile, a rows check, set-up's runs of step code, a
summary's run on fake tensors) must leave as it found: every buffer's object and values, every submodule's training
mode, and for a run that writes no values, every attribute."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["kept_buffers", "kept_modes", "kept_attributes"]


@contextmanager
def kept_buffers(modules: Iterable[nn.Module], skip: nn.Module | None = None) -> Iterator[None]:
    """Afterwards every buffer of ``modules`` and their submodules (but those of ``skip``) is the tensor it was, put
    back in its place if the run replaced it (``.to(device)`` does), holding the values it held; one the run left
    alone is not written (its version counter, by which a step's changes to the module are seen, stays)."""
    skipped = {id(part) for part in skip.modules()} if skip is not None else set()
    owners = {id(owner): owner for module in modules for owner in module.modules() if id(owner) not in skipped}
    kept = [(owner, name, buffer, buffer._version, buffer if buffer.is_meta else buffer.detach().clone())
            for owner in owners.values()
            for name, buffer in owner._buffers.items() if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buffer, version, saved in kept:
                owner._buffers[name] = buffer
                if buffer.is_meta:  # no values (a module built on the meta device, before the cut)
                    continue
                if buffer._version != version or not torch.equal(buffer, saved):  # (a kernel may write in place
                    # without counting it: a batch norm's running statistics)
                    buffer.copy_(saved)


@contextmanager
def kept_modes(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Afterwards every submodule of ``modules`` is in the training mode it was in."""
    modes = [(part, part.training) for module in modules for part in module.modules()]
    try:
        yield
    finally:
        for part, training in modes:
            part.training = training


@contextmanager
def kept_attributes(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Afterwards every submodule of ``modules`` holds the attributes it held, and its dicts (parameters, buffers,
    submodules, hooks) what they held: whatever a run set on them (a cache, a first-call flag, a hook left where the
    run failed, eval mode) is gone. The tensors' values are not kept: for runs that write none (on fake tensors)."""
    saved = []
    for part in (part for module in modules for part in module.modules()):
        attributes = dict(part.__dict__)
        saved.append((part, attributes, {key: dict(value) for key, value in attributes.items()
                                         if isinstance(value, dict)}))
    try:
        yield
    finally:
        for part, attributes, contents in saved:
            for key, items in contents.items():
                attributes[key].clear()
                attributes[key].update(items)
            part.__dict__.clear()
            part.__dict__.update(attributes)
