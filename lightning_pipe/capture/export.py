"""Capture a model's forward with ``torch.export`` (non-strict, training IR): dynamic sizes first, else one input shape.

Export runs the forward in Python on fake tensors and records the aten ops it calls, each with the stack of modules
that called it (``nn_module_stack``), which is what the segments are cut by. Things the capture would otherwise get
silently wrong are refused here with a message that says what to do: a custom ``torch.autograd.Function`` whose
backward is not its forward's derivative (export keeps its forward ops and drops its backward; :mod:`.functions`
checks), a key/value cache (Hugging Face ``use_cache``), control flow on a tensor's value, and what the forward does
under the patches of :mod:`.tracing` (gradients taken, backward hooks, ``requires_grad`` set in the forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import sys
import warnings
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch.export import Dim, ExportedProgram

from .assignments import Assignments, Read, appended_refusal, assignment_advice, carried_advice, stored_advice
from .devices import META, faking_device, on_meta, to_meta
from .errors import CaptureError, explain_export_error, listed, locate_exception, module_names
from .functions import frozen_checkpoint_advice, not_derivatives, watch_autograd_functions
from .guards import guarded_sizes
from .host_random import host_random_advice, watch_host_random
from .tracing import (
    conversions_in_place,
    derivative_transform,
    gradient_flag_advice,
    gradient_flags_kept,
    gradients_taken,
    keywords_named,
    masks_as_given,
    mode,
    no_backward_hooks,
    no_caches,
    no_dynamic_marks,
    no_gradients_taken,
    no_partial_graphs,
    recomputed_by_hooks,
    watch_checkpoints,
)

__all__ = ["export_forward", "register_dataclass"]


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
                stack.callback(no_dynamic_marks, args, kwargs)
                stack.enter_context(mode(model, training))
                stack.enter_context(no_caches(model))
                stack.enter_context(keywords_named(model, args, kwargs))
                stack.enter_context(masks_as_given())
                stack.enter_context(conversions_in_place())
                stack.enter_context(no_gradients_taken(type(model).__name__))
                stack.enter_context(no_partial_graphs())
                stack.enter_context(no_backward_hooks(model, names))
                functions, checkpoints, frozen = stack.enter_context(watch_autograd_functions(names))
                own_checkpoints = stack.enter_context(watch_checkpoints(names))
                drawn = stack.enter_context(watch_host_random(names, model))
                stack.enter_context(assignments.watch())
                if meta:
                    stack.enter_context(on_meta(model))
                    stack.enter_context(faking_device(device))
                stack.enter_context(gradient_flags_kept(model, names, toggled))
                shapes = _dynamic_shapes(model, args, kwargs, fixed) if symbolic else None
                stack.enter_context(warnings.catch_warnings())
                # An RNN re-lists its parameters in _flat_weights as it runs; the graph reads the parameters themselves
                warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights\[")
                recomputed = recomputed_by_hooks(model)
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
            transform = derivative_transform(error)
            if transform is not None:
                raise CaptureError(gradients_taken(type(model).__name__, transform)) from error
            first_error = first_error or error
            attempts.pop(0)
            if attempts and not _fails_at_any_size(error):
                continue
            raise explain_export_error(error, model, training, names) from error
        if drawn:
            raise CaptureError(host_random_advice(type(model).__name__, drawn))
        if toggled:
            raise CaptureError(gradient_flag_advice(type(model).__name__, toggled))
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
        if checkpoints and not rematerialized and training:  # (evaluation keeps no activations: not said again)
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

