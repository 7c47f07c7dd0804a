"""Lightning's weight-averaging callbacks (``StochasticWeightAveraging``, ``WeightAveraging`` and its EMA) on a cut
module: each averages this rank's share.

Both copy the whole LightningModule in their ``setup`` hook, which runs before the strategy cuts the module, and
later pair the copy's parameters with the module's by position (``zip(average.parameters(), module.parameters())``).
Once the module holds one rank's share, the pairs no longer match: the first update fails on a shape, or, where the
shapes happen to agree, averages one layer into another silently. So, once cut, each such callback's copy is made
again from the cut module. Its ``state_dict`` then has this rank's keys under the full model's names, which the
pipeline's checkpoint merges across ranks like any callback state; it loads this rank's share of a whole model's state
(a resume gives it the checkpoint's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch.nn as nn

__all__ = ["recopy_weight_averages"]


def recopy_weight_averages(callbacks: Iterable[Any], module: Any, on_any_rank: Callable[[bool], bool]) -> int:
    """Make each weight-averaging callback's copy of ``module`` again from the cut module (before the strategy moves
    it to its device and precision, as the callbacks copy it); the number of callbacks changed. A callback that has
    not made its copy yet (outside ``fit``) is left alone. ``on_any_rank(flag)``: whether any rank's flag is set
    (a collective, called alike on every rank)."""
    # Imported here: the callbacks' module imports much of Lightning, and the strategy needs it only with them.
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.6
        WeightAveraging = ()  # type: ignore[assignment,misc]  # noqa: N806
    changed = 0
    for callback in callbacks:
        if getattr(callback, "_average_model", None) is None:
            continue
        if isinstance(callback, StochasticWeightAveraging):
            # Whether to add an epoch that recomputes batch-norm statistics is asked of the module at fit start: of
            # the whole model on every rank, or ranks without a BatchNorm would stop an epoch earlier than the rest.
            whole = on_any_rank(callback.pl_module_contains_batch_norm(module))
            callback.pl_module_contains_batch_norm = lambda pl_module: whole
            callback._average_model = _loads_a_share(copy.deepcopy(module))
        elif isinstance(callback, WeightAveraging):
            from torch.optim.swa_utils import AveragedModel

            callback._average_model = _loads_a_share(AveragedModel(
                model=module, device=callback._device or module.device, use_buffers=callback._use_buffers,
                **callback._kwargs))
        else:
            continue
        changed += 1
    return changed


def _loads_a_share(average: nn.Module) -> nn.Module:
    """``average``, whose ``load_state_dict`` takes the whole model's state (a resumed checkpoint's) and loads this
    rank's share of it; with ``strict``, a key of the share that the state lacks is still an error."""
    load = average.load_state_dict

    def load_share(state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        own = average.state_dict().keys()
        missing = [key for key in own if key not in state_dict]
        if strict and missing:
            raise RuntimeError(f"the averaged model's state lacks {missing[:10]} of this rank's share")
        return load({key: state_dict[key] for key in own if key in state_dict}, strict=strict, assign=assign)

    average.load_state_dict = load_share  # type: ignore[method-assign]
    return average
