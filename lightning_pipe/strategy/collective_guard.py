"""Collectives of ``torch.distributed`` over every process that code of the user's or of a library calls where under a
pipeline no other rank would come: refused at once, with why, instead of a hang until the wait timeout.

Every process of a pipeline holds other stages, and each runs a step's code at its own time (the code before the model
on the first stage, the rest on the last, once per micro-batch). So a collective over the default group in the step's
own code (lightly's DINO loss syncing its center, ``if dist.is_initialized(): dist.all_reduce(...)``, as for DDP) or
in an optimizer made for data parallelism (distributed Muon's ``all_gather``) is never matched, or matched by another
rank's other collective. :func:`collectives_refused` puts stand-ins in ``torch.distributed``'s namespaces that ask a
``refusal`` first, for calls from code of neither torch, Lightning nor this package.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["collectives_refused", "COLLECTIVES"]

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "scatter", "gather", "barrier")


_KNOWN: dict[int, tuple[dict[str, Any], list[str]]] = {}  # a namespace's id -> it and its names bound to collectives


@contextmanager
def collectives_refused(refusal: Callable[[str, str], str | None],
                        spaces: Iterable[dict[str, Any]] = ()) -> Iterator[None]:
    """Inside, a collective of ``torch.distributed`` over every process (the default group) called by code of neither
    torch, Lightning nor this package raises ``RuntimeError(refusal(name, caller))`` where that gives a text (None:
    the call goes on). ``caller``: the calling code's file and line. Guarded: ``torch.distributed``'s functions,
    their definitions in ``distributed_c10d``, and the names in ``spaces`` (modules' globals) bound to them."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    def guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)  # (its signature torch's, where guards nest: found by review, a subgroup's call
        # was taken for one over every process)
        def call(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if _users(caller) and _over_every_process(original, args, kwargs):
                said = refusal(name, f"{caller.f_code.co_filename}:{caller.f_lineno}")
                if said is not None:
                    raise RuntimeError(said)
            return original(*args, **kwargs)
        return call

    originals = {name: getattr(c10d, name) for name in COLLECTIVES if callable(getattr(c10d, name, None))}
    stand_ins = {name: guarded(name, original) for name, original in originals.items()}
    by_function = {id(original): name for name, original in originals.items()}
    places = []
    for space in {id(space): space for space in (vars(dist), vars(c10d), *spaces)}.values():
        known = _KNOWN.get(id(space))
        if known is None or known[0] is not space:  # (each namespace read through once: a step enters this)
            known = _KNOWN[id(space)] = (space, [key for key, value in list(space.items()) if id(value) in by_function
                                                 and value is originals.get(by_function[id(value)])])
        places += [(space, key, space[key]) for key in known[1] if id(space.get(key)) in by_function]
    for space, key, value in places:
        space[key] = stand_ins[by_function[id(value)]]
    try:
        yield
    finally:
        for space, key, value in places:
            space[key] = value


def _over_every_process(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> bool:
    import torch.distributed as dist

    try:
        group = inspect.signature(function).bind_partial(*args, **kwargs).arguments.get("group")
    except (TypeError, ValueError):
        return False
    return group is None or group is dist.group.WORLD


def _users(frame: Any) -> bool:
    """Whether ``frame`` runs code of neither torch, Lightning nor this package (by its module's name)."""
    package = (frame.f_globals.get("__name__", "") or "").split(".")[0]
    return package not in ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_pipe")
