"""What the gradient hooks compute, made the whole model's under a pipeline, and what they do that is not.

Each rank runs a gradient hook (``on_before_optimizer_step``, ``on_after_backward``, ``configure_gradient_clipping``,
an ``optimizer_step`` that clips) over its own stages' parameters. Inside them, torch's ``clip_grad_norm_`` and
``get_total_norm`` take the norm over every rank (:class:`~.gradients.GlobalNorms`), the total of Lightning's
``grad_norm`` read by its key is the whole model's, and ``clip_grad_value_`` has nothing to clip on a rank without
gradients (:func:`clipping_by`). What cannot be made so is looked for and warned of: random draws per parameter
(:class:`Draws`), and every gradient multiplied by a factor of each rank's own share (:class:`Scales`).
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_pipe.capture.generators import HeldGenerators, generator_state, same_state
from lightning_pipe.strategy.gradients import GlobalNorms
from lightning_pipe.strategy.randomness import global_random_states, same_random_states

__all__ = ["clipping_by", "clip_grad_value", "Draws", "Scales"]

_DRAW_CHECKS = 4  # calls of each gradient hook looked at for random draws (:class:`Draws`)
_SCALE_CHECKS = 8  # calls of each looked at for a factor of each rank's share, then 16, 32, ... (:class:`Scales`)


@contextlib.contextmanager
def clipping_by(clip: GlobalNorms | None, hook: Callable[..., Any]) -> Iterator[list[int]]:
    """Inside, torch's ``clip_grad_norm_`` and ``get_total_norm`` (which ``clip_grads_with_norm_`` follows) are
    ``clip``'s, Lightning's ``grad_norm`` gives the whole model's total (:func:`_grad_norm`) and ``clip_grad_value_``
    takes a list without gradients (:func:`clip_grad_value`): as their modules' attributes, and where the hook's
    module imported them by name (``from torch.nn.utils import clip_grad_norm_``), or the function holding the hook
    did.
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
            (clip_grad.clip_grad_value_, functools.partial(clip_grad_value, clip_grad.clip_grad_value_),
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


def clip_grad_value(original: Callable[..., Any], parameters: Any, clip_value: float, *args: Any,
                    **kwargs: Any) -> None:
    """torch's ``clip_grad_value_`` (``original``: in the hooks, and in Lightning's own clipping by value), which
    fails on a list of no gradients: a layer's ``.parameters()`` where another rank holds the layer
    (``self.net[4].parameters()``), or a rank whose parameters are all frozen, has nothing to clip here (found by
    review: torch's "Expected !nested_tensorlist[0].empty()" on that rank)."""
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
    """``grad_norm``'s dict, whose total read by its key (``norms["grad_2.0_norm_total"]``, a spike guard's test) or
    taken out with ``pop`` is the norm over every rank's gradients, taken then (a collective, made where every rank
    reads it), as one device reads it; each rank's share made a decision alone (found by review: an update one device
    skips, taken). Its items as they are listed (``self.log_dict(norms)``) are this rank's: the logs are gathered
    over the ranks."""

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

    def pop(self, key: str, *default: Any) -> Any:  # (the total taken out, the rest logged)
        if key != self._key or key not in self:
            return super().pop(key, *default)
        value = self[key]
        super().pop(key)
        return value


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


class Draws:
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


class Scales:
    """Whether a gradient hook multiplied every gradient of each rank by one factor, another on each rank, looked for
    on its first :data:`_SCALE_CHECKS` calls and at calls 16, 32, 64, ...: a factor computed from a norm over
    ``self.parameters()`` by hand (normalized gradients, a clip written out) is each rank's share's, so the weights
    are not one device's. torch's ``get_total_norm`` and ``clip_grad_norm_`` there are every rank's, and give every
    rank one factor. What each rank found travels in the hook's gather."""

    def __init__(self, module: LightningModule) -> None:
        self.module, self.calls, self.warned = module, 0, False
        self.tolerance = 1e-4  # relative: gradients' rounding where they are multiplied (bfloat16's 2**-7 for it)

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
        if before is not None:  # (read now: the hook may set gradients to None)
            self.tolerance = max([1e-4] + [torch.finfo(p.grad.dtype).eps for p in params])
        yield found
        if before is None:
            return
        after = _norms([p.grad for p in params])  # (a gradient set to None, optimizer.zero_grad(): zero)
        kept = before > 0
        if int(kept.sum()) < 2 or bool((after[~kept] != 0).any()):
            return
        ratios = after[kept] / before[kept]
        first = float(ratios[0])
        if bool(((ratios - first).abs() <= self.tolerance * max(first, 1e-12)).all()):
            found[0] = first

    def judge(self, hook: Callable[..., Any], factors: list[Any]) -> None:
        """Warn (once) where every rank found one factor, neither 0 nor 1 (a part of the model zeroed or left alone:
        a warm-up of the head alone), and the ranks' differ."""
        if self.warned or len(factors) < 2 or any(not isinstance(f, float) for f in factors):
            return
        if any(f == 0 or abs(f - 1) <= 1e-6 for f in factors) or \
                max(factors) - min(factors) <= 2 * self.tolerance * max(map(abs, factors)):
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



def _norms(grads: list[torch.Tensor | None]) -> torch.Tensor:
    norms = torch.zeros(len(grads), dtype=torch.float64)
    held = [index for index, grad in enumerate(grads) if grad is not None]
    if held:  # (one copy to the host)
        norms[held] = torch.stack([norm.double() for norm in torch._foreach_norm([grads[i] for i in held])]).cpu()
    return norms
