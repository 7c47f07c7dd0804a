"""Custom ``torch.autograd.Function`` s met while capturing, and whether their backward is their forward's derivative.

A captured graph keeps a Function's forward ops and differentiates them itself; the Function's own ``backward`` never
runs. That is exact when the backward is the derivative of the forward (Bloom's ``GeLUFunction`` writes the tanh-GELU's
derivative out by hand) and silently wrong otherwise (a straight-through estimator, a gradient reversal). So every
Function applied during the capture is recorded with the shapes it was applied to, and afterwards, outside export,
checked on random inputs of those shapes in float64: its ``backward`` against autograd through its own ``forward``.
One that agrees is captured; one that differs, or cannot be run that way, is refused unless the user vouches for it
(``allow_autograd_functions=True``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint

from .errors import locate_frame

_GRAD = torch.autograd.grad  # bound once: a capture refuses calls of torch.autograd.grad from the forward

__all__ = ["Applied", "watch_autograd_functions", "not_derivatives", "frozen_checkpoint_advice"]

_MAX_ELEMENTS = 1 << 20  # per checked input; larger shapes are shrunk alike in every input (a size stays one size)
_CHECKED: dict[tuple[type, tuple], str | None] = {}  # (class, its arguments' key) -> why it failed (None: passed)
_CHECKED_MAX = 4096  # entries kept before the cache starts over


@dataclasses.dataclass(frozen=True)
class Applied:
    """A custom Function applied in the capture: its class, where (module and line), and its first call's arguments
    (tensors as ``_Like``: shape, dtype, whether it needs a gradient)."""

    cls: type
    where: str
    example: tuple

    def __str__(self) -> str:
        return f"{self.cls.__qualname__} (from {self.cls.__module__}) in {self.where}"


@dataclasses.dataclass(frozen=True)
class _Like:
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@contextlib.contextmanager
def watch_autograd_functions(names: dict[int, str]) -> Iterator[tuple[list[Applied], list[str], list[str]]]:
    """Records every custom Function applied inside the block (torch's own are left alone: their backward is their
    forward's derivative), and apart from them, where torch's reentrant activation checkpoint (``CheckpointFunction``)
    was applied. That checkpoint's layers run plainly instead: the Function runs them under no_grad and recomputes
    them in its backward, which a graph would keep as a no_grad region (no gradient to those layers or any before
    them). Plainly, the gradients are its own where an input tensor needs a gradient (then plain autograd gives
    what its recompute gives); its forward draws the same random numbers as a plain run (it restores them to
    recompute). Where no input needs one (the layers before it frozen), it gives its layers none, which a graph
    would keep even after those layers are unfrozen (a fine-tuning callback): listed in ``frozen``, to refuse."""
    base = torch.autograd.function.Function
    original = base.__dict__["apply"]  # a classmethod, or (torch >= 2.14) a C classmethod descriptor
    found: list[Applied] = []
    checkpoints: list[str] = []
    frozen: list[str] = []
    reentrant = getattr(torch.utils.checkpoint, "CheckpointFunction", None)

    def spy(cls: type, *args: Any, **kwargs: Any) -> Any:
        if cls is reentrant:
            where = locate_frame(sys._getframe(1), names)
            if where not in checkpoints:
                checkpoints.append(where)
            function, _, *inputs = args
            if torch.is_grad_enabled() and not any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
                if where not in frozen:
                    frozen.append(where)
            return function(*inputs)
        elif not cls.__module__.startswith("torch."):
            where = locate_frame(sys._getframe(1), names)
            if not any(a.cls is cls and a.where == where for a in found):
                found.append(Applied(cls, where, tuple(pytree.tree_map(_like, args)) if not kwargs else ()))
        return original.__get__(None, cls)(*args, **kwargs)

    base.apply = classmethod(spy)
    try:
        yield found, checkpoints, frozen
    finally:
        base.apply = original


def frozen_checkpoint_advice(model_name: str, frozen: list[str]) -> str:
    """The error for a reentrant checkpoint none of whose inputs needed a gradient while captured (``frozen``)."""
    return (f"{model_name}.forward checkpoints activations with torch.utils.checkpoint's reentrant variant "
            f"(use_reentrant=True) where no input of the checkpoint needs a gradient, in {frozen[0]}: it gives those "
            f"layers no gradient, also on one device (torch warns of it there: its input is the batch itself, or "
            f"comes from frozen layers), and a captured graph would keep that after any layers before it are "
            f"unfrozen. Use use_reentrant=False (Hugging Face: gradient_checkpointing_kwargs="
            f"{{'use_reentrant': False}}), or make the checkpoint's input need a gradient "
            f"(model.enable_input_require_grads()), or turn the model's checkpointing off and pass "
            f"PipelineStrategy(checkpoint_activations=True)")


def not_derivatives(applied: list[Applied]) -> list[str]:
    """The Functions of ``applied`` whose backward is not their forward's derivative, or could not be checked, each
    described with the reason; each class is checked once per process for each arguments it is applied to (shapes,
    and values other than tensors: a scale of -1 at one call makes a gradient reversal of a Function exact at 1)."""
    refused = []
    for entry in applied:
        key = (entry.cls, _key(entry.example))
        if key not in _CHECKED:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = _check(entry.cls, entry.example)
        reason = _CHECKED[key]
        if reason is not None:
            refused.append(f"{entry} ({reason})")
    return refused


def _key(example: tuple) -> tuple:
    """What the check of a call depends on: its tensors' shapes, dtypes and gradient flags, its numbers and strings,
    the types of its other arguments."""
    def part(leaf: Any) -> Any:
        if isinstance(leaf, _Like):
            return leaf
        if isinstance(leaf, (bool, int, float, str, type(None))):
            return type(leaf).__qualname__, repr(leaf)  # 1, 1.0 and True apart; a NaN equal to itself
        return type(leaf).__qualname__

    leaves, spec = pytree.tree_flatten(example)
    return (str(spec), *map(part, leaves))


def _like(value: Any) -> Any:
    """A recorded argument: a tensor's shape (its sizes' hints where symbolic), dtype and gradient flag."""
    if isinstance(value, torch.Tensor):
        return _Like(tuple(_hint(size) for size in value.shape), value.dtype, value.requires_grad)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return _hint(value)
    return value


def _hint(size: Any) -> Any:
    if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = size.node.hint
        return hint if hint is not None else 2  # an unbacked size: any small one serves the check
    return size


def _check(cls: type, example: tuple) -> str | None:
    """Why ``cls``'s backward is not the derivative of its forward on random inputs shaped as ``example`` (None when
    it is)."""
    if not example:
        return "called with keyword arguments: not checked"
    if not any(isinstance(v, _Like) and v.dtype.is_floating_point for v in pytree.tree_leaves(example)):
        return None  # nothing to differentiate
    shapes = _shrunk([v.shape for v in pytree.tree_leaves(example) if isinstance(v, _Like)])
    failed: BaseException | None = None
    # every floating input first (one that needs no gradient now may need one later: a frozen layer thawed); then
    # only those that need one (a Function that updates a float buffer in place cannot take a leaf needing one)
    for everything in (True, False):
        try:
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(0)
                return _compare(cls, example, shapes, everything)
        except Exception as error:  # noqa: BLE001 - a Function that cannot run this way is not checked
            failed = error  # the last attempt's: the first may fail for the check's own leaves
    assert failed is not None
    modules = (": it is given modules and runs their layers itself, and a captured graph differentiates only what its "
               "forward runs with gradients on, so layers it runs under torch.no_grad() to recompute them in its own "
               "backward (reversible layers, Reformer's) get no gradient that way whatever the flag below; keep such "
               "layers in an nn.Sequential" if any(isinstance(leaf, torch.nn.Module)
                                                   for leaf in pytree.tree_leaves(example)) else "")
    return (f"could not be checked on random inputs: {type(failed).__name__}: {str(failed).splitlines()[0][:150]}"
            f"{modules}")


# how floating inputs are drawn; the backward is compared on each draw where its forward's derivative is defined for
# most elements (outside the forward's domain, NaN, it means nothing, and any backward would agree with NaN):
# standard normal; its absolute values (a square root, a logarithm); in (-1, 1) (an inverse hyperbolic tangent); a
# hundredth of the first two (an arccosine of dot products, which YOSO's attention takes of unit vectors)
_DRAWS = (("normal", 1.0), ("absolute", 1.0), ("tanh", 1.0), ("normal", 0.01), ("absolute", 0.01))
_UNDEFINED = "undefined"


def _compare(cls: type, example: tuple, shapes: dict[int, int], everything: bool) -> str | None:
    compared = 0
    for draw in _DRAWS:
        outcome = _compare_drawn(cls, example, shapes, everything, draw)
        if outcome == _UNDEFINED:
            continue
        if outcome is not None:
            return outcome
        compared += 1
    if compared:
        return None
    return ("its forward's derivative is NaN or infinite for most elements of every kind of random input tried, so "
            "its backward could not be checked")


def _compare_drawn(cls: type, example: tuple, shapes: dict[int, int], everything: bool,
                   draw: tuple[str, float]) -> str | None:
    """Why the backward differs from the derivative on inputs drawn as ``draw`` says, where that derivative is
    defined; ``_UNDEFINED`` where it is not, for most elements; None where they agree."""
    leaves, spec = pytree.tree_flatten(example)
    smallest = min((shapes.get(size, size) for v in leaves if isinstance(v, _Like) for size in v.shape if size > 0),
                   default=1)
    inputs = [_random(v, shapes, smallest, everything, draw) if isinstance(v, _Like) else v for v in leaves]
    pairs = [(tensor, like.requires_grad) for tensor, like in zip(inputs, leaves)
             if isinstance(like, _Like) and tensor.requires_grad]
    differentiable, needed = [tensor for tensor, _ in pairs], [need for _, need in pairs]
    own = pytree.tree_leaves(cls.apply(*pytree.tree_unflatten(inputs, spec)))
    traced = pytree.tree_leaves(_forward(cls, pytree.tree_unflatten(inputs, spec)))
    outputs = [(a, b) for a, b in zip(own, traced) if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
    if len(own) != len(traced) or not outputs:
        return "its forward run on its own gives other outputs"
    for a, b in outputs:
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-8, equal_nan=True):
            return "its forward run on its own gives other values (it draws random numbers, or uses its context)"
    cotangents = [torch.randn_like(a) for a, _ in outputs]
    backward = _grads([a for a, _ in outputs], differentiable, cotangents)  # the Function's own backward
    derivative = _grads([b for _, b in outputs], differentiable, cotangents)  # autograd through its forward
    compared: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for tensor, mine, true, need in zip(differentiable, backward, derivative, needed):
        if not need and (mine is None or true is None or not bool(mine.any())):
            continue  # an input needing no gradient here that one side does not differentiate (a float mask, a label,
            # a straight-through estimator's data input)
        mine = torch.zeros_like(tensor) if mine is None else mine
        true = torch.zeros_like(tensor) if true is None else true
        compared.append((mine, true, torch.isfinite(true)))
    elements = sum(defined.numel() for _, _, defined in compared)
    if elements and sum(int(defined.sum()) for _, _, defined in compared) < 0.5 * elements:
        return _UNDEFINED
    for mine, true, defined in compared:
        if not bool(torch.isfinite(mine[defined]).all()):
            return "its backward gives NaN or infinity where its forward's derivative is finite, on random inputs"
        if not torch.allclose(mine[defined], true[defined], rtol=1e-5, atol=1e-8):
            worst = (mine[defined] - true[defined]).abs().max().item()
            return f"its backward differs from its forward's derivative by up to {worst:.3g} on random inputs"
    return None


def _forward(cls: type, args: tuple) -> Any:
    """``cls``'s forward run as plain ops under autograd, as a captured graph runs it."""
    if any("setup_context" in vars(klass) for klass in cls.__mro__ if not klass.__module__.startswith("torch.")):
        return cls.forward(*args)
    needs = tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return cls.forward(_Context(needs), *args)


def _grads(outputs: list[torch.Tensor], inputs: list[torch.Tensor], cotangents: list[torch.Tensor]) -> list:
    """The gradients of ``inputs`` (None where the outputs give one none)."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return [None for _ in inputs]
    return list(_GRAD([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True))


def _random(like: _Like, shapes: dict[int, int], smallest: int, everything: bool,
            draw: tuple[str, float] = ("normal", 1.0)) -> torch.Tensor:
    """A random tensor like ``like``: floating ones drawn as ``draw`` says (see ``_DRAWS``), needing a gradient (all,
    or those that needed one); masks half true; integers in [0, ``smallest``), the smallest size of any input, so
    that as indices they fit any dimension."""
    shape = tuple(shapes.get(size, size) for size in like.shape)
    if like.dtype.is_floating_point:
        kind, scale = draw
        value = torch.randn(shape, dtype=torch.float64)
        value = {"normal": value, "absolute": value.abs(), "tanh": torch.tanh(value)}[kind] * scale
        return value.requires_grad_(everything or like.requires_grad)
    if like.dtype.is_complex:
        return torch.randn(shape, dtype=torch.complex128)
    if like.dtype == torch.bool:
        return torch.rand(shape) < 0.5
    return torch.randint(0, max(1, smallest), shape, dtype=like.dtype)


def _shrunk(shapes: list[tuple[int, ...]]) -> dict[int, int]:
    """A smaller size for the largest sizes, the same for every input, until no input is over ``_MAX_ELEMENTS``."""
    sizes: dict[int, int] = {}
    while True:
        numel = max((math.prod(sizes.get(s, s) for s in shape) for shape in shapes), default=0)
        if numel <= _MAX_ELEMENTS:
            return sizes
        largest = max((s for shape in shapes for s in shape), key=lambda s: sizes.get(s, s))
        if sizes.get(largest, largest) <= 2:
            return sizes
        sizes[largest] = max(2, sizes.get(largest, largest) // 2)


class _Context:
    """What a Function's forward may ask of its context when it runs as plain ops."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass
