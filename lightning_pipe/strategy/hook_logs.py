"""What hooks outside the step log about the model, made one device's, and the same, on every rank.

Lightning's way to track gradient norms logs in ``on_before_optimizer_step`` (or ``on_after_backward``)
``self.log_dict(grad_norm(self, norm_type=2))``, in the module or in a callback: each parameter's norm and their
total. Under a pipeline every rank
runs the hook over its own stages' parameters, and global rank 0, whose loggers write, logged the first stage's norms
and a total over them alone. Here every rank's logs of such a hook are gathered over the pipeline (every rank runs
the hook at the same point of a synchronous step) and every rank logs the union: a name one rank logged, its value; a
name several logged alike (a tied parameter's norm, a learning rate), that value; a ``grad_norm`` total, the p-norm of
every rank's parameter norms, as one device computes it.

The epoch-end hooks (``on_train_epoch_end``, ``on_validation_epoch_end``, ``on_test_epoch_end`` of the module and of
the user's callbacks) are gathered alike: what they log from the shared step results is the same everywhere, and a
name one rank alone logged (under ``trainer.is_global_zero``) is every rank's. A name the ranks logged with other
values (a weight norm over ``self.parameters()``, each rank's share) takes the first stage's value on every rank, with
a warning: it is not one device's, but a ``ModelCheckpoint`` or ``EarlyStopping`` watching it decides alike on every
rank (each rank's own value named a checkpoint file per rank). Values travel as JSON text (:mod:`.plain`), never
pickled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule

from lightning_pipe.strategy.gradient_hooks import Draws, Scales, clipping_by
from lightning_pipe.strategy.gradients import GlobalNorms
from lightning_pipe.strategy.log_sink import lightning_log, logs_to

__all__ = ["gather_hook_logs", "release_hook_logs", "merge_hook_logs"]

_GRADIENT_HOOKS = ("on_before_optimizer_step", "on_after_backward")
_CLIPPING = "configure_gradient_clipping"  # the module's: gathered, and clipped by every rank's norm
_STEPPING = "optimizer_step"  # the module's, where it clips after calling the closure: clipped so, not gathered
_EPOCH_HOOKS = ("on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end")
_HOOKS = _GRADIENT_HOOKS + _EPOCH_HOOKS + (_CLIPPING, _STEPPING)
_TOTAL = re.compile(r"^grad_(?P<p>[0-9.]+|inf)_norm_total$")


def gather_hook_logs(module: LightningModule, gather_text: Callable[[str], list[str]],
                     callbacks: Sequence[Callback] = (), clip: GlobalNorms | None = None,
                     tied: Mapping[str, str] | None = None) -> None:
    """Wrap the gradient and epoch-end hooks of the module and of ``callbacks`` (``grad_norm`` logged from a callback's
    ``on_before_optimizer_step``; Lightning's own callbacks log nothing there), and the module's
    ``configure_gradient_clipping``, so that what they log through the module is every rank's (``gather_text``: every
    pipeline rank's text, a collective every rank makes in the hook, which ends with another rank's error where that
    rank failed; synchronous schedules only, whose ranks all reach it). In those and in the module's
    ``optimizer_step`` (clipping after it called the closure), torch's ``clip_grad_norm_`` and ``get_total_norm``
    are ``clip``'s (where given): the norm over every rank's gradients, as one device clips by. ``tied``: each name
    of a tied parameter -> its first name, which one device's ``grad_norm`` lists it by (a rank holding another
    place of it knows it by another name). Hooks not overridden are left alone; :func:`release_hook_logs` undoes
    it."""
    for owner, base in [(module, LightningModule), *((callback, Callback) for callback in callbacks)]:
        lightnings = type(owner).__module__.split(".")[0] in ("lightning", "pytorch_lightning")
        names = _GRADIENT_HOOKS if lightnings else _HOOKS if owner is module else _GRADIENT_HOOKS + _EPOCH_HOOKS
        for name in names:
            if getattr(type(owner), name) is getattr(base, name) or name in vars(owner):
                continue
            hook = getattr(owner, name)
            if name == _STEPPING:
                setattr(owner, name, functools.partial(_clipping, hook, clip))
                continue
            gradients = name in (*_GRADIENT_HOOKS, _CLIPPING)
            setattr(owner, name, functools.partial(_gathered, module, hook, gather_text, clip if gradients else None,
                                                   Draws(owner, module) if gradients else None, dict(tied or {}),
                                                   Scales(module) if gradients else None))


def release_hook_logs(module: LightningModule, callbacks: Sequence[Callback] = ()) -> None:
    """The hooks as they were (after the fit: the pipeline's group is gone)."""
    for owner in (module, *callbacks):
        for name in _HOOKS:
            wrapped = vars(owner).get(name)
            if isinstance(wrapped, functools.partial) and wrapped.func in (_gathered, _clipping):
                delattr(owner, name)


def _clipping(hook: Callable[..., Any], clip: GlobalNorms | None, *args: Any, **kwargs: Any) -> Any:
    with clipping_by(clip, hook):
        return hook(*args, **kwargs)


def _gathered(module: LightningModule, hook: Callable[..., Any], gather_text: Callable[[str], list[str]],
              clip: Callable[..., Any] | None, draws: Draws | None, tied: Mapping[str, str],
              scales: Scales | None, *args: Any, **kwargs: Any) -> Any:
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def log(name: str, value: Any, *rest: Any, **options: Any) -> None:
        if rest or not _number(value):  # positional options, a Metric, a tensor of several values: as it was
            lightning_log(module, name, value, *rest, **options)
        else:
            calls.append((name, value, options))

    # A hook that fails raises here at once: the others, in the gather or waiting inside their hooks for this rank (a
    # barrier), end with its error (``gather_text`` is watched).
    with logs_to(module, log), clipping_by(clip, hook) as normed, \
            draws.watched(hook) if draws is not None else contextlib.nullcontext(), \
            scales.watched() if scales is not None else contextlib.nullcontext([None]) as scaled:
        result = hook(*args, **kwargs)
    if normed[0]:  # (gradients changed by torch's norms, which are every rank's: by parts of their own, say)
        scaled[0] = None
    alone = [name for param in (getattr(clip, "alone", None) or []) for name, held in module.named_parameters()
             if held is param][:2]
    calls = [(_one_device_name(name, tied), value, options) for name, value, options in calls]
    texts = [json.loads(text) for text in gather_text(json.dumps(
        {"logs": [[name, _as_float(value)] for name, value, _ in calls], "alone": alone, "scaled": scaled[0]}))]
    if scales is not None:
        scales.judge(hook, [text["scaled"] for text in texts])
    merged, differing = merge_hook_logs([[(name, value) for name, value in text["logs"]] for text in texts])
    if len(texts) > 1 and all(len(text["alone"]) == 1 for text in texts) and \
            len({text["alone"][0] for text in texts}) == len(texts):
        _warn_alone(hook, [text["alone"][0] for text in texts])
    if differing:
        owner = getattr(hook, "__self__", None)
        names, where = ", ".join(differing[:5]), f"{type(owner).__name__}.{hook.__name__}" if owner else hook.__name__
        fix = ("take a gradient norm with torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if "
               "p.grad is not None]), which this hook takes over every rank (so that a decision on it, skipping a "
               "spiky update, is the same on every rank: on its share, each rank decides alone), log values of each "
               "parameter (Lightning's grad_norm: its total is made the whole model's), or " if
               hook.__name__ in (*_GRADIENT_HOOKS, _CLIPPING) else "")
        warnings.warn(f"{names} logged in {where} take another value on each rank of the pipeline (each holds its own "
                      f"stages' parameters: a norm over self.parameters() is this rank's share), so every rank logs "
                      f"the first stage's, which is not one device's (a ModelCheckpoint or EarlyStopping watching it "
                      f"decides alike on every rank). For the whole model's value, {fix}add up each rank's share "
                      f"over the pipeline's ranks: torch.distributed.all_reduce(share, group=trainer.strategy."
                      f"pipeline_group) (for a norm, of its square). A name counted along a loop over the model's "
                      f"modules counts this rank's layers: name each by named_modules()", stacklevel=2)
    for name, value, options in calls:  # this rank's names first, in its order, with its options
        lightning_log(module, name, merged.pop(name, _as_float(value)), **options)
    options = calls[0][2] if calls else {}
    for name, value in merged.items():  # the other ranks' (their parameters' norms), as this rank logs its own
        lightning_log(module, name, value, **options)
    return result


def _warn_alone(hook: Callable[..., Any], names: list[str]) -> None:
    """Every rank clipped one parameter alone, each another (a subset clipped by its joint norm, each rank holding
    one of it), once per hook."""
    if getattr(hook, "__func__", hook) in _ALONE_WARNED:
        return
    _ALONE_WARNED.add(getattr(hook, "__func__", hook))
    warnings.warn(f"{hook.__name__} gave clip_grad_norm_ a list of one parameter on each rank of the pipeline "
                  f"({', '.join(names)}): a list of one parameter is clipped by its own norm, as in a loop clipping "
                  f"each alone. If they are one set clipped by its joint norm, whose parameters the ranks hold one "
                  f"each, pass it as a generator, which is every rank's share of a whole: clip_grad_norm_((p for n, p "
                  f"in self.named_parameters() if n in chosen), max_norm)", stacklevel=3)


_ALONE_WARNED: set[Any] = set()


_PER_PARAMETER = re.compile(r"^(?P<norm>grad_(?:[0-9.]+|inf)_norm/)(?P<name>.+)$")  # grad_norm's, of each parameter


def _one_device_name(name: str, tied: Mapping[str, str]) -> str:
    """A ``grad_norm`` entry of a tied parameter under the name one device lists it by (its first): a rank holding
    the tie's other place (a head tied to the embedding) logged it by that place's name, so the log held one name
    more than one device's and the total counted the tie twice (found by review: 15.8102 against 15.7960)."""
    found = _PER_PARAMETER.match(name)
    return f"{found['norm']}{tied[found['name']]}" if found and found["name"] in tied else name


def merge_hook_logs(every: list[list[tuple[str, float]]]) -> tuple[dict[str, float], list[str]]:
    """The union of every rank's ``(name, value)`` logs in rank order, and the names several ranks logged with other
    values (the first rank's value in the union); a ``grad_{p}_norm_total`` is the p-norm over the union's
    ``grad_{p}_norm`` values of each parameter."""
    values: dict[str, list[float]] = {}
    for logged in every:
        for name, value in logged:
            values.setdefault(name, []).append(value)
    merged: dict[str, float] = {}
    differing: list[str] = []
    for name, seen in values.items():
        if _TOTAL.match(name):
            continue
        merged[name] = seen[0]
        if not all(math.isclose(value, seen[0], rel_tol=1e-6, abs_tol=1e-12) or value != value for value in seen):
            differing.append(name)
    for name in values:
        found = _TOTAL.match(name)
        if found is None:
            continue
        prefix = f"grad_{found['p']}_norm"
        parts = [value for key, value in merged.items() if key.startswith(prefix) and key != name]
        if parts:
            merged[name] = float(torch.tensor(parts, dtype=torch.float64).norm(float(found["p"])))
    return merged, differing


def _number(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    """A logged value as a number, without torch's warning for a tensor made with a gradient (from the weights)."""
    return float(value.detach() if isinstance(value, torch.Tensor) else value)
