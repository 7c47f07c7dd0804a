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
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule

from lightning_pipe.capture.generators import HeldGenerators, generator_state, same_state
from lightning_pipe.strategy.gradients import GlobalNorms
from lightning_pipe.strategy.randomness import global_random_states, same_random_states

__all__ = ["gather_hook_logs", "release_hook_logs", "merge_hook_logs"]

_GRADIENT_HOOKS = ("on_before_optimizer_step", "on_after_backward")
_CLIPPING = "configure_gradient_clipping"  # the module's: gathered, and clipped by every rank's norm
_STEPPING = "optimizer_step"  # the module's, where it clips after calling the closure: clipped so, not gathered
_EPOCH_HOOKS = ("on_train_epoch_end", "on_validation_epoch_end", "on_test_epoch_end")
_HOOKS = _GRADIENT_HOOKS + _EPOCH_HOOKS + (_CLIPPING, _STEPPING)
_DRAW_CHECKS = 4  # calls of each gradient hook looked at for random draws (:class:`_Draws`)
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
                                                   _Draws(owner, module) if gradients else None, dict(tied or {}),
                                                   _Scales(module) if gradients else None))


def release_hook_logs(module: LightningModule, callbacks: Sequence[Callback] = ()) -> None:
    """The hooks as they were (after the fit: the pipeline's group is gone)."""
    for owner in (module, *callbacks):
        for name in _HOOKS:
            wrapped = vars(owner).get(name)
            if isinstance(wrapped, functools.partial) and wrapped.func in (_gathered, _clipping):
                delattr(owner, name)


def _clipping(hook: Callable[..., Any], clip: GlobalNorms | None, *args: Any, **kwargs: Any) -> Any:
    with _clipping_by(clip, hook):
        return hook(*args, **kwargs)


@contextlib.contextmanager
def _clipping_by(clip: GlobalNorms | None, hook: Callable[..., Any]) -> Iterator[list[int]]:
    """Inside, torch's ``clip_grad_norm_`` and ``get_total_norm`` (which ``clip_grads_with_norm_`` follows) are
    ``clip``'s, Lightning's ``grad_norm`` gives the whole model's total (:func:`_grad_norm`) and ``clip_grad_value_``
    takes an empty list (:func:`_clip_grad_value_`): as their modules' attributes, and where the hook's module
    imported them by name (``from torch.nn.utils import clip_grad_norm_``), or the function holding the hook did.
    Yields a list holding how many times the first two were called in the block (their norms are every rank's)."""
    used = [0]
    if clip is None:
        yield used
        return

    def counted(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            used[0] += 1
            return function(*args, **kwargs)
        return call

    import lightning.pytorch.utilities as utilities
    import lightning.pytorch.utilities.grads as grads
    import torch.nn.utils.clip_grad as clip_grad

    functions, function = [], getattr(hook, "__func__", hook)
    while function is not None and len(functions) < 8:  # the hook, and what a decorator wrapped (@torch.no_grad())
        functions.append(function)
        function = getattr(function, "__wrapped__", None)
    spaces = list({id(space): space for space in (getattr(f, "__globals__", None) for f in functions)
                   if isinstance(space, dict)}.values())
    cells = [cell for f in functions for cell in (getattr(f, "__closure__", None) or ())]  # (imported in a function)
    places: list[tuple[Any, str, Any, Any]] = []  # (owner, key, torch's, the stand-in)
    for original, stand_in, where in (
            (clip_grad.clip_grad_norm_, counted(clip.clip_grad_norm_), ((torch.nn.utils, "clip_grad_norm_"),
                                                                        (clip_grad, "clip_grad_norm_"))),
            (clip_grad._get_total_norm, counted(clip.get_total_norm), ((torch.nn.utils, "get_total_norm"),
                                                                       (clip_grad, "_get_total_norm"))),
            (grads.grad_norm, functools.partial(_grad_norm, grads.grad_norm, clip), ((utilities, "grad_norm"),
                                                                                    (grads, "grad_norm"))),
            (clip_grad.clip_grad_value_, functools.partial(_clip_grad_value_, clip_grad.clip_grad_value_),
             ((torch.nn.utils, "clip_grad_value_"), (clip_grad, "clip_grad_value_")))):
        places += [(owner, key, original, stand_in) for owner, key in where if hasattr(owner, key)]
        places += [(names, key, original, stand_in) for names in spaces for key, value in list(names.items())
                   if value is original]
        places += [(cell, "", original, stand_in) for cell in cells if _content(cell) is original]
    for owner, key, _, stand_in in places:
        _put(owner, key, stand_in)
    try:
        with clip.listings():
            yield used
    finally:
        for owner, key, original, _ in places:
            _put(owner, key, original)


def _clip_grad_value_(original: Callable[..., Any], parameters: Any, clip_value: float, *args: Any,
                      **kwargs: Any) -> None:
    """torch's ``clip_grad_value_``, which fails on a list of no gradients: a layer's ``.parameters()`` where another
    rank holds the layer (``self.net[4].parameters()``), or a rank whose parameters are all frozen, has nothing to clip
    here (found by review: torch's "Expected !nested_tensorlist[0].empty()" on that rank)."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if any(p.grad is not None for p in params):
        original(params, clip_value, *args, **kwargs)


def _grad_norm(original: Callable[..., dict[str, Any]], clip: GlobalNorms, module: torch.nn.Module,
               norm_type: float | int | str, group_separator: str = "/") -> dict[str, Any]:
    """Lightning's ``grad_norm`` in a gradient hook: each of this rank's parameters' norms, and a total that, read by
    its key, is the whole model's (:class:`_WholeTotal`)."""
    norms = original(module, norm_type, group_separator)
    key = f"grad_{float(norm_type)}_norm_total"
    norms.setdefault(key, torch.tensor(0.0))  # (a rank without gradients, its stages frozen, reads it too)
    return _WholeTotal(norms, key, lambda: clip.get_total_norm(
        [p.grad for p in module.parameters() if p.grad is not None], float(norm_type)))


class _WholeTotal(dict):
    """``grad_norm``'s dict, whose total read by its key (``norms["grad_2.0_norm_total"]``, a spike guard's test) is
    the norm over every rank's gradients, taken then (a collective, made where every rank reads it), as one device
    reads it; each rank's share made a decision alone (found by review: an update one device skips, taken). Its
    items as they are listed (``self.log_dict(norms)``) are this rank's: the logs are gathered over the ranks."""

    def __init__(self, norms: dict[str, Any], key: str, whole: Callable[[], torch.Tensor]) -> None:
        super().__init__(norms)
        self._key, self._whole, self._value = key, whole, None

    def __getitem__(self, key: str) -> Any:
        if key != self._key or key not in self:
            return super().__getitem__(key)
        if self._value is None:
            self._value = self._whole()
        return self._value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


def _content(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # (empty)
        return None


def _put(owner: Any, key: str, value: Any) -> None:
    if isinstance(owner, types.CellType):
        owner.cell_contents = value
    elif isinstance(owner, dict):
        owner[key] = value
    else:
        setattr(owner, key, value)


class _Draws:
    """Whether a gradient hook draws random numbers, looked for on its first :data:`_DRAW_CHECKS` calls: each rank
    runs it over its own stages' parameters, so a draw per parameter starts every rank from the same state of the
    generator, and the stages after the first get other numbers than one device gives their parameters."""

    def __init__(self, owner: Any, module: LightningModule) -> None:
        self.owner, self.module, self.left = owner, module, _DRAW_CHECKS

    @contextlib.contextmanager
    def watched(self, hook: Callable[..., Any]) -> Iterator[None]:
        if self.left <= 0:
            yield
            return
        self.left -= 1
        held = HeldGenerators(self.module)
        kept = [(f"self.{name} of {type(self.owner).__name__}", value, generator_state(value))
                for name, value in vars(self.owner).items() if generator_state(value) is not None] \
            if self.owner is not self.module else []
        states = global_random_states()
        yield
        drawn = held.drawn() + [where for where, value, state in kept if not same_state(generator_state(value), state)]
        if not same_random_states(global_random_states(), states):
            drawn.append("a global generator (torch's, Python's random or NumPy's)")
        if drawn:
            self.left = 0
            warnings.warn(f"{type(self.owner).__name__}.{hook.__name__} draws random numbers ({', '.join(drawn)}) "
                          f"on every rank of the pipeline, each over its own stages' parameters: a draw per "
                          f"parameter (gradient noise, a random mask of gradients) starts every rank from the same "
                          f"state of the generator, so each stage but the first gets other numbers than one device "
                          f"gives its parameters. For draws that are the same whatever the cut, seed each "
                          f"parameter's from its name and the step, which every rank knows alike: for name, p in "
                          f"self.named_parameters(): g = torch.Generator().manual_seed(zlib.crc32(f'{{self."
                          f"global_step}}:{{name}}'.encode()))", stacklevel=3)


class _Scales:
    """Whether a gradient hook multiplied every gradient of each rank by one factor, another on each rank, looked for
    on its first :data:`_SCALE_CHECKS` calls and at calls 16, 32, 64, ...: a factor computed from a norm over
    ``self.parameters()`` by hand (normalized gradients, a clip written out) is each rank's share's, so the weights
    are not one device's. torch's ``get_total_norm`` and ``clip_grad_norm_`` there are every rank's, and give every
    rank one factor. What each rank found travels in the hook's gather."""

    def __init__(self, module: LightningModule) -> None:
        self.module, self.calls, self.warned = module, 0, False

    @contextlib.contextmanager
    def watched(self) -> Iterator[list[float | None]]:
        """Yields a list that holds, after the block, the one factor the block multiplied every gradient by (1.0:
        none changed), or None (not looked at, fewer than two gradients, or not one factor)."""
        found: list[float | None] = [None]
        self.calls += 1
        due = not self.warned and (self.calls <= _SCALE_CHECKS or self.calls & (self.calls - 1) == 0)
        params = [p for p in self.module.parameters() if p.grad is not None and p.grad.is_floating_point()
                  and p.grad.layout == torch.strided and not p.grad.is_meta] if due else []
        before = _norms([p.grad for p in params]) if len(params) >= 2 else None
        yield found
        if before is None:
            return
        after = _norms([p.grad for p in params])  # (a gradient set to None, optimizer.zero_grad(): zero)
        kept = before > 0
        if int(kept.sum()) < 2 or bool((after[~kept] != 0).any()):
            return
        ratios = after[kept] / before[kept]
        first = float(ratios[0])
        if bool(((ratios - first).abs() <= 1e-4 * max(first, 1e-12)).all()):
            found[0] = first

    def judge(self, hook: Callable[..., Any], factors: list[Any]) -> None:
        """Warn (once) where every rank found one factor, neither 0 nor 1 (a part of the model zeroed or left alone:
        a warm-up of the head alone), and the ranks' differ."""
        if self.warned or len(factors) < 2 or any(not isinstance(f, float) for f in factors):
            return
        if any(f == 0 or abs(f - 1) <= 1e-6 for f in factors) or \
                max(factors) - min(factors) <= 1e-4 * max(map(abs, factors)):
            return
        self.warned = True
        owner = getattr(hook, "__self__", None)
        where = f"{type(owner).__name__}.{hook.__name__}" if owner is not None else hook.__name__
        shown = ", ".join(f"{f:.4g}" for f in factors)
        warnings.warn(f"{where} multiplied every gradient by one factor on each rank of the pipeline, another on each "
                      f"({shown}, by stage). If that factor comes from a norm taken by hand over self.parameters() "
                      f"(each rank holds its own stages' parameters: a normalization or a clip written out), it is "
                      f"each rank's share's and the weights differ from one device's (if each stage holds a part "
                      f"the hook scales by its own norm on purpose, a clip of each part, this is right). For the "
                      f"whole model's norm, take it with torch.nn.utils.get_total_norm([p.grad for p in "
                      f"self.parameters() if p.grad is not None]) or clip with torch.nn.utils.clip_grad_norm_, which "
                      f"this hook takes over every rank, or add up each rank's squared share: torch.distributed."
                      f"all_reduce(share, group=trainer.strategy.pipeline_group)", stacklevel=3)


_SCALE_CHECKS = 8


def _norms(grads: list[torch.Tensor | None]) -> torch.Tensor:
    norms = torch.zeros(len(grads), dtype=torch.float64)
    held = [index for index, grad in enumerate(grads) if grad is not None]
    if held:  # (one copy to the host)
        norms[held] = torch.stack([norm.double() for norm in torch._foreach_norm([grads[i] for i in held])]).cpu()
    return norms


def _gathered(module: LightningModule, hook: Callable[..., Any], gather_text: Callable[[str], list[str]],
              clip: Callable[..., Any] | None, draws: _Draws | None, tied: Mapping[str, str],
              scales: _Scales | None, *args: Any, **kwargs: Any) -> Any:
    calls: list[tuple[str, Any, dict[str, Any]]] = []
    real = module.log

    def log(name: str, value: Any, *rest: Any, **options: Any) -> None:
        if rest or not _number(value):  # positional options, a Metric, a tensor of several values: as it was
            real(name, value, *rest, **options)
        else:
            calls.append((name, value, options))

    module.log = log  # type: ignore[method-assign]  # an instance attribute shadows the method (log_dict calls it)
    # A hook that fails raises here at once: the others, in the gather or waiting inside their hooks for this rank (a
    # barrier), end with its error (``gather_text`` is watched).
    try:
        with _clipping_by(clip, hook) as normed, \
                draws.watched(hook) if draws is not None else contextlib.nullcontext(), \
                scales.watched() if scales is not None else contextlib.nullcontext([None]) as scaled:
            result = hook(*args, **kwargs)
    finally:
        del module.log
    if normed[0]:  # (gradients changed by torch's norms, which are every rank's: by parts of their own, say)
        scaled[0] = None
    alone = [name for param in (getattr(clip, "alone", None) or []) for name, held in module.named_parameters()
             if held is param][:2]
    calls = [(_one_device_name(name, tied), value, options) for name, value, options in calls]
    texts = [json.loads(text) for text in gather_text(json.dumps(
        {"logs": [[name, float(value)] for name, value, _ in calls], "alone": alone, "scaled": scaled[0]}))]
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
        real(name, merged.pop(name, float(value)), **options)
    options = calls[0][2] if calls else {}
    for name, value in merged.items():  # the other ranks' (their parameters' norms), as this rank logs its own
        real(name, value, **options)
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
