"""A precision that converts the weights (``bf16-true``, ``16-true``, ``64-true``) converts each rank's share only.

A captured model is captured in the dtypes it will train in, so the precision converts it before the capture; but a
capture reads the model's tensors only for their shapes, dtypes and names (it runs on meta twins). So the captured
model is converted on meta stand-ins: each of its tensors becomes a meta tensor of the converted dtype whose value is
to come from the original (:class:`~.materialize.LocalMaterializer`'s ``sources``) once the cut says which tensors
this rank keeps. A rank converts, and reads, only its own layers: a float32 checkpoint that ``from_pretrained`` maps
into memory (each page read when touched) and ``bf16-true`` trains is never converted whole, and no rank holds the
whole model in two dtypes (``benchmarks/pretrained.py``). The values are the ones a conversion of the whole model
gives (``copy_`` into the converted dtype rounds as ``.to`` does).

The code around the model (the step's own parameters and buffers) is converted at once, as before. So is everything
when the cut is planned (the profile runs the layers on rank 0), when the model is the module's own forward, and under
precisions whose conversion does more than change dtypes (bitsandbytes' and Transformer Engine's replace layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision

from lightning_pipe.capture.materialize import put_in_place
from lightning_pipe.strategy.host_built import own_tensors
from lightning_pipe.strategy.materialize import meta_like

__all__ = ["converted_later", "restore"]

_DTYPES_ONLY = (HalfPrecision, DoublePrecision)  # conversions that change floating dtypes and nothing else


def converted_later(module: nn.Module, model: nn.Module, precision: Precision) -> dict[int, torch.Tensor]:
    """Convert ``module`` with ``precision``, the tensors of ``model`` (a submodule) as meta stand-ins (but those that
    modules outside ``model`` hold too); returns ``{id(stand-in): original}``, the values the materializer gives them
    on the ranks that keep them. Empty, and everything converted at once, when the precision does more than change
    dtypes or changes none of ``model``'s."""
    if type(precision) not in _DTYPES_ONLY:
        precision.convert_module(module)
        return {}
    inside = {id(child) for child in model.modules()}
    # a tensor the code around the model holds too (a head tied to the model's embedding) runs on every rank: as before
    outside = {id(t) for child in module.modules() if id(child) not in inside for _, t in own_tensors(child)}
    originals = {name: t for name, t in _named_tensors(model).items() if not t.is_meta and id(t) not in outside}
    stand_ins: dict[int, torch.Tensor] = {}
    for tensor in originals.values():
        if id(tensor) not in stand_ins:
            stand_ins[id(tensor)] = meta_like(tensor)
    put_in_place([module], stand_ins)
    try:
        precision.convert_module(module)
    except BaseException:
        _put_back(module, model, originals)
        raise
    converted = _named_tensors(model)
    if all(converted[name].dtype == original.dtype for name, original in originals.items()):
        _put_back(module, model, originals)
        return {}
    return {id(converted[name]): original for name, original in originals.items()}


def restore(module: nn.Module, sources: dict[int, torch.Tensor], precision: Precision) -> None:
    """Undo :func:`converted_later` when the cut did not happen (a capture failed): the originals back in ``module``,
    converted as a whole, as the precision converts a module; ``sources`` emptied."""
    if not sources:
        return
    put_in_place([module], sources)
    sources.clear()
    precision.convert_module(module)


def _put_back(module: nn.Module, model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """The originals back in place of what ``model`` holds under their names now (stand-ins, or their conversions)."""
    now = _named_tensors(model)
    put_in_place([module], {id(now[name]): original for name, original in originals.items()})


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
