"""What a capture's forward runs under while torch's export traces it: patches of torch and of the model, each put
back afterwards, that refuse what a captured graph would silently drop (gradients taken in the forward, backward
hooks, ``requires_grad`` set in the forward), let export through where a branch or a swap only picks a kernel or
converts nothing (a causal mask's hint, a module converted to what it is), keep torch quiet (its partial graphs) and
clean (its dynamic marks), and watch what the forward does (activation checkpoints).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch.fx import Tracer

from .errors import SEQUENTIAL_PATH, CaptureError, listed, locate_frame

__all__ = ["conversions_in_place", "derivative_transform", "gradient_flag_advice", "gradient_flags_kept",
           "gradients_taken", "keywords_named", "masks_as_given", "mode", "no_backward_hooks", "no_caches",
           "no_dynamic_marks", "no_gradients_taken", "no_partial_graphs", "recomputed_by_hooks", "watch_checkpoints"]


def gradients_taken(name: str, how: str) -> str:
    return (f"{name}.forward takes gradients itself ({how}: a physics-informed network's residual, a force field's "
            f"-dE/dx, a gradient penalty): a pipeline runs the forward as a graph cut into stages, which such "
            f"gradients cannot cross (to the input, on the first stage). Train such a model on one device or with DDP")


_DERIVATIVES = ("jacobian", "hessian", "vjp", "jvp", "hvp", "vhp")  # torch.autograd.functional's


def derivative_transform(error: BaseException) -> str | None:
    """The torch.func or torch.autograd.functional derivative (``jacrev``, ``grad``, ``jacobian``...) that ``error``
    (or an error it came from) was raised inside, if any: export fails inside such transforms before reaching
    torch.autograd.grad, with messages about its own internals (found by review: a PINN's residual by
    ``vmap(jacrev(u))``)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for frame in traceback.extract_tb(current.__traceback__):
            path = frame.filename.replace("\\", "/")
            if path.endswith("/torch/_functorch/eager_transforms.py"):  # (jacrev, jacfwd, grad, hessian, vjp, jvp)
                return "torch.func's derivatives (jacrev, jacfwd, grad, hessian, vjp, jvp)"
            if path.endswith("/torch/autograd/functional.py") and frame.name in _DERIVATIVES:
                return f"torch.autograd.functional.{frame.name}"
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def no_gradients_taken(name: str) -> Iterator[None]:
    """A forward that takes gradients itself (``torch.autograd.grad``: a PINN's residual, a force field's ``-dE/dx``)
    is refused with the reason: torch's export fails on it with a message about fake constants. Watched both by name
    and where torch.autograd runs its backward, so that a ``grad`` imported before the capture
    (``from torch.autograd import grad``) or a ``backward()`` is refused as well."""
    grad, run = torch.autograd.grad, getattr(torch.autograd, "_engine_run_backward", None)

    def refused(*_: Any, **__: Any) -> Any:
        raise CaptureError(gradients_taken(name, "torch.autograd.grad"))

    def run_refused(*_: Any, **kwargs: Any) -> Any:
        how = "torch.autograd.grad" if kwargs.get("accumulate_grad", True) is False else "a backward()"
        raise CaptureError(gradients_taken(name, how))

    torch.autograd.grad = refused
    if run is not None:
        torch.autograd._engine_run_backward = run_refused
    try:
        yield
    finally:
        torch.autograd.grad = grad
        if run is not None:
            torch.autograd._engine_run_backward = run


_DYNAMIC_MARKS = ("_dynamo_weak_dynamic_indices", "_dynamo_dynamic_indices", "_dynamo_dynamic_range",
                  "_dynamo_static_indices", "_dynamo_unbacked_indices", "_dynamo_propagated_dynamic_indices",
                  "_has_dynamo_dim_marking")


def no_dynamic_marks(args: tuple, kwargs: dict[str, Any]) -> None:
    """Take off the marks torch's export puts on the input tensors for their symbolic sizes, which it takes off only
    when it succeeds: a failed symbolic attempt left them, and the fallback to the example's sizes then traced
    symbolic sizes anyway, which a capture per shape took for sizes it serves (found by review: a GRU's second
    sequence length met a graph of the first's)."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            for mark in _DYNAMIC_MARKS:
                if mark in leaf.__dict__:
                    delattr(leaf, mark)


@contextlib.contextmanager
def no_partial_graphs() -> Iterator[None]:
    """torch's export prints the graph traced so far to stderr when tracing meets a data-dependent branch: thousands
    of lines of graph code on every attempt, before the capture's own refusal (found by review: DETR's ~3,400 lines).
    The graph is dropped from the error; the refusal names the module and line instead."""
    trace = Tracer.trace

    @functools.wraps(trace)
    def quiet(self: Tracer, *args: Any, **kwargs: Any) -> Any:
        try:
            return trace(self, *args, **kwargs)
        except RuntimeError as error:
            error.__dict__.pop("partial_fx_graph", None)
            raise

    Tracer.trace = quiet
    try:
        yield
    finally:
        Tracer.trace = trace


@contextlib.contextmanager
def gradient_flags_kept(model: nn.Module, names: dict[int, str], changed: list[str]) -> Iterator[None]:
    """A forward that sets its modules' ``requires_grad`` (lightly's ``SwaVPrototypes`` freezing its prototypes for
    the first steps, ``self.requires_grad_(step >= n)``) does it once, at the capture, on the capture's stand-ins,
    and the graph keeps no such call: the real parameters never change (found by review: trained otherwise,
    silently). The modules of ``model`` that call it are listed in ``changed``; the real parameters' flags are put
    back."""
    before = [(param, param.requires_grad) for param in model.parameters()]
    inside = {id(part) for part in model.modules()}
    original = nn.Module.requires_grad_

    def noted(module: nn.Module, requires_grad: bool = True) -> nn.Module:
        if id(module) in inside and any(p.requires_grad != requires_grad for p in module.parameters()):  # (one
            # that changes nothing, a frozen teacher frozen again, is no matter: found by review)
            where = names.get(id(module)) or type(model).__name__
            if where not in changed:
                changed.append(where)
        return original(module, requires_grad)

    nn.Module.requires_grad_ = noted  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.requires_grad_ = original  # type: ignore[method-assign]
        for param, flag in before:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def gradient_flag_advice(model: str, changed: list[str]) -> str:
    return (f"{model}.forward sets requires_grad of the parameters of {listed(changed)} (requires_grad_, as lightly's "
            f"SwaVPrototypes freezes its prototypes for the first steps when given step=): a captured graph keeps no "
            f"such call, so the parameters would stay as the capture left them. Set it outside the forward, in a "
            f"hook every rank runs (on_train_batch_start: self.prototypes.requires_grad_(self.global_step >= n)), "
            f"and call the model without it (for lightly's heads: no step argument); {SEQUENTIAL_PATH}")


@contextlib.contextmanager
def no_backward_hooks(model: nn.Module, names: dict[int, str]) -> Iterator[None]:
    """Backward hooks inside the forward are not in a captured graph: a tensor's ``register_hook`` on an activation
    (a gradient reversal written as a hook, DANN's) and a module's backward hooks would silently never run (the
    gradients before them -2x one device's, found by review); refused, with the place."""
    hooked = [names.get(id(part), type(part).__name__) or type(model).__name__ for part in model.modules()
              if part._backward_hooks or part._backward_pre_hooks]
    advice = ("a captured graph keeps the forward's operations, not backward hooks. Write the gradient's change "
              "with the forward's operations (a gradient reversal: -alpha * h + ((1 + alpha) * h).detach(), whose "
              "value is h and whose gradient is -alpha times h's), or as a custom torch.autograd.Function (a "
              "gradient reversal's backward returning -alpha * grad), which the capture checks, or keep the layers "
              "in an nn.Sequential the step calls (PipelineStrategy(layers=...)), "
              "whose layers run as themselves")
    if hooked:
        raise CaptureError(f"{type(model).__name__} has backward hooks on {listed(hooked)} "
                           f"(register_full_backward_hook): {advice}")
    register = torch.Tensor.register_hook

    def refused(tensor: torch.Tensor, hook: Any) -> Any:
        raise CaptureError(f"{type(model).__name__}.forward registers a hook on a tensor's gradient "
                           f"(register_hook in {locate_frame(sys._getframe(1), names)}): {advice}")

    torch.Tensor.register_hook = refused  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.register_hook = register  # type: ignore[method-assign]


def recomputed_by_hooks(model: nn.Module) -> list[str]:
    """The attributes that torch's old ``weight_norm`` and ``spectral_norm`` hooks set before each forward from their
    parameters (``l1.weight`` from ``l1.weight_g`` and ``l1.weight_v``): plain attributes, recomputed at every call,
    which export says were assigned (harmless here: the graph computes them from the parameters)."""
    names = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm") and isinstance(getattr(hook, "name", None), str):
                names.append(f"{name}.{hook.name}" if name else hook.name)
    return names


@contextlib.contextmanager
def keywords_named(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
    """While export runs, a forward taking some of ``kwargs`` through ``**kwargs`` (PEFT's ``PeftModel.forward(*args,
    **kwargs)``, a Hugging Face model given an extra keyword) names them in its signature: torch's export lays the
    symbolic sizes of such inputs out one way when it checks them and another when it builds their ranges ("Must
    provide a tree_name when there might be a mismatch"). The instance's own ``forward`` stands in for the class's
    and calls it; it is removed afterwards."""
    signature = inspect.signature(model.forward)
    spill = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    extra = signature.bind(*args, **kwargs).arguments.get(spill, {}) if spill else {}
    if not extra or "forward" in model.__dict__:
        yield
        return
    original = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    named = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*named, *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra)])
    model.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


@contextlib.contextmanager
def masks_as_given() -> Iterator[None]:
    """torch's ``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` compare an attention mask given without an
    ``is_causal`` hint with a causal mask of its size, to use a causal kernel (``bool((mask == causal).all())``: a
    branch on tensor values, which export cannot capture; Lightning's demo ``Transformer`` meets it). The hint only
    chooses a kernel: while export runs, a mask without a hint is applied as given (the hint is kept when given)."""
    import torch.nn.modules.transformer as transformer

    detect = getattr(transformer, "_detect_is_causal_mask", None)
    if detect is None:
        yield
        return

    def as_given(mask: torch.Tensor | None, is_causal: bool | None = None, size: int | None = None) -> bool:
        return is_causal is True

    transformer._detect_is_causal_mask = as_given
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = detect


@contextlib.contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Train or eval mode for the capture: a model already in that mode is captured as it is, each module in its own
    mode (a frozen backbone's batch norms in eval while the model trains; :func:`.cache.modes_of`); one in the other
    mode is set to it whole; every module's own flag is put back afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    if model.training != training:
        model.train(training)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def no_caches(model: nn.Module) -> Iterator[None]:
    """Hugging Face models build a key/value cache when ``config.use_cache`` is on (in training too), which export
    cannot return and no stage could pass on: the capture runs with it off (the model's config is put back)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", False) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


@contextlib.contextmanager
def watch_checkpoints(names: dict[int, str]) -> Iterator[list[str]]:
    """Records where torch's non-reentrant activation checkpoint ran inside the block (``checkpoint`` looks its
    generator up at each call, so a ``functools.partial`` of ``checkpoint`` made earlier is seen too). torch >= 2.14
    calls the generator's ``_impl``, which the older name wraps there."""
    module = torch.utils.checkpoint
    name = next((n for n in ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator")
                 if hasattr(module, n)), None)
    original = getattr(module, name) if name is not None else None
    found: list[str] = []
    if original is None:
        yield found
        return

    def spy(*args: Any, **kwargs: Any) -> Any:
        where = locate_frame(sys._getframe(1), names)
        if where not in found:
            found.append(where)
        return original(*args, **kwargs)

    setattr(module, name, spy)
    try:
        yield found
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def conversions_in_place() -> Iterator[None]:
    """A module converted in its own forward to what it already is (Switch Transformers' router runs
    ``self.classifier = self.classifier.to(self.dtype)`` every call) is left as it is while export runs: torch's
    ``Module._apply`` would swap each parameter with itself, which export's tracked parameters refuse ("Couldn't
    swap Linear.weight"). A conversion that changes something still runs (and fails as before)."""
    apply = nn.Module._apply

    def in_place(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
        modules = list(module.modules() if recurse else [module])
        tensors = [t for m in modules for table in (m._parameters, m._buffers) for t in table.values() if t is not None]
        # a module overriding _apply may convert more than its tensors (plain tensor attributes): it runs as it is
        if all(type(m)._apply is apply for m in modules[1:]) and all(fn(t) is t for t in tensors):
            return module
        return apply(module, fn, recurse)

    nn.Module._apply = in_place  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module._apply = apply  # type: ignore[method-assign]
