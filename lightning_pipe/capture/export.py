"""Capture a model's forward with ``torch.export`` (non-strict, training IR): dynamic sizes first, else one input shape.

Export runs the forward in Python on fake tensors and records the aten ops it calls, each with the stack of modules
that called it (``nn_module_stack``), which is what the segments are cut by. Things the capture would otherwise get
silently wrong are refused here with a message that says what to do: a custom ``torch.autograd.Function`` whose
backward is not its forward's derivative (export keeps its forward ops and drops its backward; :mod:`.functions`
checks), a key/value cache (Hugging Face ``use_cache``), control flow on a
tensor's value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import traceback
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch.export import Dim, ExportedProgram
from torch.fx import Tracer

from .assignments import Assignments, Read, appended_refusal, assignment_advice, carried_advice, stored_advice
from .devices import META, faking_device, on_meta, to_meta
from .errors import (
    SEQUENTIAL_PATH,
    CaptureError,
    explain_export_error,
    listed,
    locate_exception,
    locate_frame,
    module_names,
)
from .functions import frozen_checkpoint_advice, not_derivatives, watch_autograd_functions
from .guards import guarded_sizes
from .host_random import host_random_advice, watch_host_random

__all__ = ["export_forward", "register_dataclass"]


def _gradients_taken(name: str, how: str) -> str:
    return (f"{name}.forward takes gradients itself ({how}: a physics-informed network's residual, a force field's "
            f"-dE/dx, a gradient penalty): a pipeline runs the forward as a graph cut into stages, which such "
            f"gradients cannot cross (to the input, on the first stage). Train such a model on one device or with DDP")


_DERIVATIVES = ("jacobian", "hessian", "vjp", "jvp", "hvp", "vhp")  # torch.autograd.functional's


def _derivative_transform(error: BaseException) -> str | None:
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
def _no_gradients_taken(name: str) -> Iterator[None]:
    """A forward that takes gradients itself (``torch.autograd.grad``: a PINN's residual, a force field's ``-dE/dx``)
    is refused with the reason: torch's export fails on it with a message about fake constants. Watched both by name
    and where torch.autograd runs its backward, so that a ``grad`` imported before the capture
    (``from torch.autograd import grad``) or a ``backward()`` is refused as well."""
    grad, run = torch.autograd.grad, getattr(torch.autograd, "_engine_run_backward", None)

    def refused(*_: Any, **__: Any) -> Any:
        raise CaptureError(_gradients_taken(name, "torch.autograd.grad"))

    def run_refused(*_: Any, **kwargs: Any) -> Any:
        how = "torch.autograd.grad" if kwargs.get("accumulate_grad", True) is False else "a backward()"
        raise CaptureError(_gradients_taken(name, how))

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


def _no_dynamic_marks(args: tuple, kwargs: dict[str, Any]) -> None:
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
def _no_partial_graphs() -> Iterator[None]:
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
def _gradient_flags_kept(model: nn.Module, names: dict[int, str], changed: list[str]) -> Iterator[None]:
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


def _gradient_flag_advice(model: str, changed: list[str]) -> str:
    return (f"{model}.forward sets requires_grad of the parameters of {listed(changed)} (requires_grad_, as lightly's "
            f"SwaVPrototypes freezes its prototypes for the first steps when given step=): a captured graph keeps no "
            f"such call, so the parameters would stay as the capture left them. Set it outside the forward, in a "
            f"hook every rank runs (on_train_batch_start: self.prototypes.requires_grad_(self.global_step >= n)), "
            f"and call the model without it (for lightly's heads: no step argument); {SEQUENTIAL_PATH}")


@contextlib.contextmanager
def _no_backward_hooks(model: nn.Module, names: dict[int, str]) -> Iterator[None]:
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


def _recomputed_by_hooks(model: nn.Module) -> list[str]:
    """The attributes that torch's old ``weight_norm`` and ``spectral_norm`` hooks set before each forward from their
    parameters (``l1.weight`` from ``l1.weight_g`` and ``l1.weight_v``): plain attributes, recomputed at every call,
    which export says were assigned (harmless here: the graph computes them from the parameters)."""
    names = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook).__name__ in ("WeightNorm", "SpectralNorm") and isinstance(getattr(hook, "name", None), str):
                names.append(f"{name}.{hook.name}" if name else hook.name)
    return names


def export_forward(model: nn.Module, args: tuple, kwargs: dict[str, Any], *, training: bool, dynamic: bool,
                   meta: bool, allow_autograd_functions: bool, device: torch.device = META,
                   fixed_sizes: set[tuple[str, int]] | None = None, reads: list[Read] | None = None,
                   rematerialized: bool = False) -> tuple[ExportedProgram, bool]:
    """Export ``model(*args, **kwargs)`` in train or eval mode; returns the program and whether its sizes are
    symbolic (``dynamic=True`` tries that first and falls back to the example's sizes, with a warning).

    ``meta=True`` exports on meta twins of the model's state and inputs, so that no real weight is read; their fakes
    say ``device``, the device the graphs will run on, so that autocast traces as it runs there (the graphs bake
    ``device`` in; see :func:`~.devices.rewrite_devices`).

    ``fixed_sizes``: the input sizes (``(path, dim)``) earlier captures of the model fixed (:mod:`.guards`), fixed here
    too; the ones this capture fixes are added to it. ``reads`` gets the plain attributes the forward read, with the
    values the graph keeps (:class:`~.assignments.Read`). ``rematerialized``: the pipeline re-materializes every
    stage, so the forward's own ``torch.utils.checkpoint`` calls, which the graph runs plainly, go unsaid.
    """
    assignments = Assignments(model, module_names(model))
    try:
        exported = _export(model, args, kwargs, assignments, training=training, dynamic=dynamic, meta=meta,
                           allow_autograd_functions=allow_autograd_functions, device=device, fixed_sizes=fixed_sizes,
                           rematerialized=rematerialized)
        if reads is not None:
            reads.extend(assignments.reads())
        return exported
    finally:
        assignments.restore()  # the plain values a forward set are put back as they were (as torch's export does)


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], assignments: Assignments, *, training: bool,
            dynamic: bool, meta: bool, allow_autograd_functions: bool, device: torch.device,
            fixed_sizes: set[tuple[str, int]] | None, rematerialized: bool) -> tuple[ExportedProgram, bool]:
    if kwargs.get("use_cache") is True:
        raise CaptureError(f"{type(model).__name__} was called with use_cache=True: a key/value cache cannot cross "
                           f"pipeline stages; pass use_cache=False")
    names = assignments.names
    scripted = [names.get(id(part)) or type(model).__name__ for part in model.modules()
                if isinstance(part, torch.jit.ScriptModule)]
    scripted = [name for name in scripted if not any(name.startswith(f"{other}.") for other in scripted)]
    if scripted:
        raise CaptureError(f"{type(model).__name__} holds TorchScript modules (torch.jit.script) at "
                           f"{listed(scripted)}: a capture traces the forward's Python code, which a scripted "
                           f"module no longer has. Keep such modules unscripted (the pipeline runs the graph it "
                           f"captures; scripting gains nothing there), or put the layers in an nn.Sequential the step calls (PipelineStrategy("
                           f"layers=...)), whose layers run as themselves, scripted ones included")
    if meta:
        args, kwargs = to_meta(args), to_meta(kwargs)
    attempts = [True, False] if dynamic else [False]
    first_error: BaseException | None = None
    fixed = set(fixed_sizes or ())  # input sizes the symbolic capture holds at some values only (.guards)
    guards_checked = False
    while attempts:
        symbolic = attempts[0]
        drawn: list[str] = []
        toggled: list[str] = []  # modules whose parameters' requires_grad the forward set
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(_no_dynamic_marks, args, kwargs)
                stack.enter_context(_mode(model, training))
                stack.enter_context(_no_caches(model))
                stack.enter_context(_keywords_named(model, args, kwargs))
                stack.enter_context(_masks_as_given())
                stack.enter_context(_conversions_in_place())
                stack.enter_context(_no_gradients_taken(type(model).__name__))
                stack.enter_context(_no_partial_graphs())
                stack.enter_context(_no_backward_hooks(model, names))
                functions, checkpoints, frozen = stack.enter_context(watch_autograd_functions(names))
                own_checkpoints = stack.enter_context(_watch_checkpoints(names))
                drawn = stack.enter_context(watch_host_random(names, model))
                stack.enter_context(assignments.watch())
                if meta:
                    stack.enter_context(on_meta(model))
                    stack.enter_context(faking_device(device))
                stack.enter_context(_gradient_flags_kept(model, names, toggled))
                shapes = _dynamic_shapes(model, args, kwargs, fixed) if symbolic else None
                stack.enter_context(warnings.catch_warnings())
                # An RNN re-lists its parameters in _flat_weights as it runs; the graph reads the parameters themselves
                warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[")
                recomputed = _recomputed_by_hooks(model)
                if recomputed:  # the old weight_norm / spectral_norm: a pre-hook sets .weight from parameters
                    listed_ = "|".join(re.escape(f"self.{name}") for name in recomputed)
                    warnings.filterwarnings("ignore", message=rf"The tensor attributes? (?:(?:{listed_})(?:, | ))+"
                                                              rf"(?:was|were) assigned during export")
                with fx_config.patch(backed_size_oblivious=symbolic):
                    program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
                if symbolic and not guards_checked:
                    guards_checked = True
                    try:
                        more = guarded_sizes(program, inspect.signature(model.forward), args, kwargs) - fixed
                    except Exception as error:  # noqa: BLE001 - not an export failure: no fallback to fixed shapes
                        raise CaptureError(f"checking which input sizes {type(model).__name__}'s capture holds failed "
                                           f"({type(error).__name__}: {error}); pass dynamic_shapes=False to capture "
                                           f"per input shape") from error
                    if more:
                        fixed |= more
                        continue  # again, with those sizes fixed
        except CaptureError:
            raise
        except Exception as error:  # noqa: BLE001 - every export failure becomes a located CaptureError
            if drawn:  # what it drew may be why it failed (a NumPy mask as an index): the draw is the thing to fix
                raise CaptureError(host_random_advice(type(model).__name__, drawn)) from error
            if _register_output_dataclass(error):
                continue  # the same attempt again, now that export can flatten the output
            transform = _derivative_transform(error)
            if transform is not None:
                raise CaptureError(_gradients_taken(type(model).__name__, transform)) from error
            first_error = first_error or error
            attempts.pop(0)
            if attempts and not _fails_at_any_size(error):
                continue
            raise explain_export_error(error, model, training, names) from error
        if drawn:
            raise CaptureError(host_random_advice(type(model).__name__, drawn))
        if toggled:
            raise CaptureError(_gradient_flag_advice(type(model).__name__, toggled))
        if frozen:
            raise CaptureError(frozen_checkpoint_advice(type(model).__name__, frozen))
        if assignments.refused:
            raise CaptureError(assignment_advice(type(model).__name__, assignments.problems()))
        if assignments.appended:
            raise CaptureError(appended_refusal(type(model).__name__, assignments.appended))
        if assignments.changed and assignments.settled is None:
            assignments.settle(program.graph_module.code)
            continue  # again, from the values the forward set: the same graph if it does not depend on them
        if assignments.settled and assignments.depends(program.graph_module.code):
            raise CaptureError(assignment_advice(type(model).__name__, assignments.problems()))
        if assignments.stored:
            warnings.warn(stored_advice(type(model).__name__, assignments.stored), stacklevel=3)
        if assignments.carried:
            warnings.warn(carried_advice(type(model).__name__, assignments.carried), stacklevel=3)
        checkpoints += [where for where in own_checkpoints if where not in checkpoints]
        if checkpoints and not rematerialized:
            warnings.warn(f"{type(model).__name__}.forward checkpoints activations (torch.utils.checkpoint in "
                          f"{listed(checkpoints)}): a captured graph runs those layers plainly and keeps their "
                          f"activations (gradients are exact); for the memory, pass "
                          f"PipelineStrategy(checkpoint_activations=True), which re-materializes every stage",
                          stacklevel=3)
        refused = not_derivatives(functions) if functions and not allow_autograd_functions else []
        if refused:
            raise CaptureError(
                f"{type(model).__name__}.forward calls custom torch.autograd.Function(s) whose backward is not "
                f"checked to be its forward's derivative: {'; '.join(refused)}. A captured graph keeps their forward "
                f"ops but differentiates those ops itself instead of calling their backward, so their gradients "
                f"would be silently wrong. Pass allow_autograd_functions=True (PipelineStrategy("
                f"allow_autograd_functions=True), or Splitter's) if each backward is the exact derivative of its "
                f"forward, or keep the layers in one nn.Sequential (no capture)")
        if symbolic and fixed_sizes is not None:
            fixed_sizes |= fixed
        if symbolic is False and dynamic:
            reason = f"{type(first_error).__name__}: {str(first_error).strip().splitlines()[0][:200]}"
            where = locate_exception(first_error, module_names(model))
            warnings.warn(f"{type(model).__name__}: torch.export could not keep the input sizes symbolic (at "
                          f"{where}: {reason}), a limit of its tracing that some ops and layers meet (recurrent "
                          f"layers, sizes computed in Python); the model is fine and trains exactly, captured per "
                          f"input shape instead: once for each new shape, which costs time at the first batch of "
                          f"each (bucket sequence lengths, or use drop_last=True, to keep the captures few)",
                          stacklevel=3)
        return program, symbolic
    raise AssertionError("unreachable: the last attempt returns or raises")


def _register_output_dataclass(error: BaseException) -> bool:
    """Registers the dataclass export met in the model's output or inputs and could not flatten (``Found <class
    'pkg.Out'> in output, which is not a known type``; ``Unsupported input type <class 'pkg.Inputs'>``) with
    ``torch.export.register_dataclass``; whether it did. Registering is global, and is what lets the last segment
    rebuild the same dataclass."""
    found = re.search(r"Found <class '([\w.]+)'> in output|Unsupported input type <class '([\w.]+)'>", str(error))
    if found is None:
        return False
    module_name, _, qualname = (found.group(1) or found.group(2)).rpartition(".")
    cls: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    return register_dataclass(cls)


def register_dataclass(cls: Any) -> bool:
    """Registers the dataclass ``cls`` with pytree, as export flattens one (a Hugging Face ``ModelOutput`` as
    transformers does); whether it did (not for a class that is no dataclass, or one registered already)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)) or cls in pytree.SUPPORTED_NODES:
        return False  # not a dataclass, or registered already and still failing: let the error through
    generic = sys.modules.get("transformers.utils.generic")
    register = getattr(generic, "_register_model_output_pytree_node", None)
    if register is not None and issubclass(cls, generic.ModelOutput):
        # A Hugging Face ModelOutput first imported while export traced (a lazy import in forward) skipped its own
        # registration then; registered as transformers does it, so that its __init__ (which registers each class
        # it makes) does not find it registered by someone else and fail
        register(cls)
        return cls in pytree.SUPPORTED_NODES
    torch.export.register_dataclass(cls)
    return True


def _fails_at_any_size(error: BaseException) -> bool:
    """Errors that capturing with the example's sizes would meet again: control flow on tensor values, outputs
    export cannot flatten."""
    text = f"{type(error).__name__}: {error}"
    return "DataDependent" in text or "data-dependent" in text or "not a known type" in text


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                    fixed: set[tuple[str, int]] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    """``Dim.AUTO`` for every size of every tensor input but the ``fixed`` ones (``(pytree.keystr path in the bound
    arguments, dim)``), laid out as export binds the inputs to forward's parameters (a ``**kwargs`` parameter takes a
    dict of its own; a class of the user's registered with pytree, as a dataclass of inputs, its flattened list)."""
    def own(value: Any) -> bool:  # a registered class not built into pytree: export reads its flattened list
        kind = pytree._get_node_type(value)
        return kind in pytree.SUPPORTED_NODES and kind not in pytree.BUILTIN_TYPES

    def auto(path: pytree.KeyPath, value: Any) -> Any:
        if own(value):
            node = pytree.SUPPORTED_NODES[pytree._get_node_type(value)]
            keyed = node.flatten_with_keys_fn(value)[0] if node.flatten_with_keys_fn is not None else \
                [(pytree.SequenceKey(index), child) for index, child in enumerate(node.flatten_fn(value)[0])]
            return [pytree.tree_map_with_path(lambda inner, leaf: auto((*path, key, *inner), leaf), child,
                                              is_leaf=own) for key, child in keyed]
        if not isinstance(value, torch.Tensor):
            return None
        where = pytree.keystr(path)
        return {d: Dim.STATIC if (where, d) in fixed else Dim.AUTO for d in range(value.dim())}

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return pytree.tree_map_with_path(auto, dict(bound.arguments), is_leaf=own)


@contextlib.contextmanager
def _keywords_named(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
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
def _masks_as_given() -> Iterator[None]:
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
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
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
def _no_caches(model: nn.Module) -> Iterator[None]:
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
def _watch_checkpoints(names: dict[int, str]) -> Iterator[list[str]]:
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
def _conversions_in_place() -> Iterator[None]:
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
