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
from lightning_pipe.strategy.materialize import meta_like

__all__ = ["converted_later"]

_DTYPES_ONLY = (HalfPrecision, DoublePrecision)  # conversions that change floating dtypes and nothing else


def converted_later(module: nn.Module, model: nn.Module, precision: Precision) -> dict[int, torch.Tensor]:
    """Convert ``module`` with ``precision``, the tensors of ``model`` (a submodule, or ``module``) as meta
    stand-ins; returns ``{id(stand-in): original}``, the values the materializer gives them on the ranks that keep
    them. Empty, and everything converted at once, when the precision does more than change dtypes or changes none
    of ``model``'s."""
    if type(precision) not in _DTYPES_ONLY:
        precision.convert_module(module)
        return {}
    originals = _named_tensors(model)
    stand_ins: dict[int, torch.Tensor] = {}
    for tensor in originals.values():
        if not tensor.is_meta and id(tensor) not in stand_ins:
            stand_ins[id(tensor)] = meta_like(tensor)
    put_in_place([module], stand_ins)
    precision.convert_module(module)
    converted = _named_tensors(model)
    sources = {id(converted[name]): original for name, original in originals.items() if not original.is_meta}
    if all(converted[name].dtype == original.dtype for name, original in originals.items()):
        put_in_place([module], {id(converted[name]): original for name, original in originals.items()})
        return {}
    return sources


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
