"""The splitter: captures one model's forward per (mode, autocast, input pattern) and cuts every capture alike."""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .assignments import Read
from .batchnorm import defer_batch_norms
from .cache import Capture, CaptureCache, modes_of
from .coupling import rows_meet
from .devices import has_meta_state, rewrite_devices
from .errors import CaptureError
from .export import export_forward, register_dataclass
from .graph import Recompute, chained_lists, lay_out
from .graph_rows import edge_list, example_rows, rows_symbols
from .losses import counted_means, mean_losses
from .materialize import materialize
from .patterns import autocast_state, pattern_of
from .points import (
    Cut,
    SplitPoints,
    block_cuts,
    cut_label,
    default_cuts,
    listed_blocks,
    normalize_split_points,
    repeated_blocks,
)
from .programs import build_programs
from .scalars import output_dims, output_kinds, output_markers, user_outputs
from .segment import Segment, written_inputs

__all__ = ["Splitter", "split_model"]


class Splitter:
    """Cuts ``model``'s forward into segments at module boundaries, for a pipeline to place on stages.

    ::

        splitter = Splitter(model)                            # cuts around the repeated blocks
        segments = splitter.segments(args, kwargs)            # captures (train mode) and returns the segments
        live = splitter.flat_inputs(args, kwargs)             # segment 0's input: the pytree leaves of (args, kwargs)
        for segment in segments:
            live = segment(live)                              # ... the last returns the model's own output

    ``nn.Sequential(*segments)`` computes what ``model(*args, **kwargs)`` does, from ``flat_inputs``: the same
    values and gradients, dropout masks included, with the model's own parameter and buffer objects.

    ``split_points`` cut the forward where the user says (:data:`~.points.SplitPoints`); by default before every
    repeated block and after the last (:func:`~.points.default_cuts`). ``dynamic=True`` captures with symbolic sizes,
    so that one capture per mode serves every batch size and sequence length; where that fails, one capture per input
    shape (with a warning). ``recompute`` (:data:`~.graph.Recompute`) lets a segment recompute cheap input-only values
    rather than receive them. A custom ``torch.autograd.Function`` whose backward is not checked to be its
    forward's derivative (:mod:`.functions`) is refused unless ``allow_autograd_functions`` (export drops its
    backward). Hugging Face models are captured with ``config.use_cache`` off (a cache cannot cross stages); the
    config is put back. ``capture_on_meta`` (default: when some state is on the meta device, or on another device
    than the inputs) captures on meta twins of the state, so a rank never needs the whole model's weights;
    :meth:`materialize` then gives its own segments storage.
    """

    def __init__(self, model: nn.Module, split_points: SplitPoints | None = None, *, dynamic: bool = True,
                 recompute: Recompute = "auto", allow_autograd_functions: bool = False,
                 capture_on_meta: bool | None = None, rematerialized: bool = False) -> None:
        if recompute not in (True, False, "auto"):
            raise ValueError(f"recompute must be True, False or 'auto', got {recompute!r}")
        self.model = model
        self.user_cuts = split_points is not None
        self.cuts: list[Cut] = (normalize_split_points(model, split_points) if split_points is not None
                                else default_cuts(model))
        self.dynamic = dynamic
        self._fixed_sizes: set[tuple[str, int]] = set()  # input sizes a capture fixed, fixed in every later one too
        self._written_warned: set[str] = set()  # inputs the forward writes in place, warned of
        self.recompute = recompute
        self.allow_autograd_functions = allow_autograd_functions
        self.capture_on_meta = capture_on_meta
        self.rematerialized = rematerialized  # the pipeline re-materializes every stage (checkpoint_activations)
        self.device: torch.device | None = None  # where the graphs run; None: where they were captured
        self.cache = CaptureCache()
        self.unread_state: set[str] = set()  # the model's state the first capture's graphs do not read
        # the plain attributes the captured forward read, with the values the graphs keep (:func:`changed_reads`)
        self.reads: dict[tuple[int, str], Read] = {}
        self._segments: list[Segment] = []
        self._parameter_order = {name: i for i, name in enumerate(inspect.signature(model.forward).parameters)}

    # -- public API -------------------------------------------------------------------------------
    @property
    def captures(self) -> list[Capture]:
        return self.cache.captures

    @property
    def num_segments(self) -> int:
        """Segments of the cut (known after the first capture: default cuts that leave a segment empty go)."""
        if not self._segments:
            raise RuntimeError("the splitter has not captured the model yet: call splitter.segments(args, kwargs) "
                               "with an example batch first")
        return len(self._segments)

    def capture(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
                training: bool | None = None) -> Capture:
        """The capture for ``model(*args, **kwargs)`` in train or eval mode (default: the model's mode) under the
        current autocast state: found among the earlier ones, or made now (seconds). Every rank of a pipeline
        calls this with the same inputs, so that each finds the graphs its segments need."""
        training = self.model.training if training is None else training
        self.follow_modes(training)
        kwargs = self._ordered(kwargs)
        flat, _ = _flattened(args, kwargs)
        found = self.cache.for_inputs(training, flat)
        return found if found is not None else self._capture(tuple(args), kwargs, training, flat)

    def flat_inputs(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *,
                    training: bool | None = None, modes: frozenset[str] | None = None) -> tuple:
        """Segment 0's input for ``model(*args, **kwargs)``: the pytree leaves of ``(args, kwargs)`` (tensors and
        plain values, keywords in ``forward``'s parameter order), captured first if this pattern is new. ``modes``:
        the model's switches, where the caller knows them (else followed: :meth:`follow_modes`)."""
        training = self.model.training if training is None else training
        if modes is None:
            self.follow_modes(training)
        else:
            self.cache.modes = modes
        kwargs = self._ordered(kwargs)
        flat, spec = _flattened(args, kwargs)
        capture = self.cache.for_inputs(training, flat)
        if capture is None:
            capture = self._capture(tuple(args), kwargs, training, flat)
        if spec != capture.in_spec:
            raise CaptureError(f"the inputs are structured as {spec}, but captured as {capture.in_spec}; call the "
                               f"model with the same arguments each time")
        return tuple(flat)

    def follow_modes(self, training: bool) -> frozenset[str]:
        """Run the segments' graphs for the model's switches as they are now: its modules in the other mode than
        ``training`` (a frozen backbone's batch norms in eval) by name, and the flags its forward reads that were
        changed since they were first captured (a callback's ``bn.track_running_stats = False``) as ``place=value``;
        each such state has graphs of its own. :meth:`capture` and :meth:`flat_inputs` follow them; a rank that runs
        only later segments calls this; returns them."""
        self.cache.modes = self.switches(training)
        return self.cache.modes

    def switches(self, training: bool) -> frozenset[str]:
        """The model's switches now, as :meth:`follow_modes` names them (without following them)."""
        return modes_of(self.model, training) | self.changed_flags()

    def changed_flags(self) -> frozenset[str]:
        """The flags (``True`` / ``False``) the forward read that hold the other value now, as ``place=value``."""
        found = []
        for read in self.reads.values():
            if type(read.value) is bool:
                now = read.module.__dict__.get(read.name, read.value)
                if type(now) is bool and now != read.value:
                    found.append(f"{read.place}={now}")
        return frozenset(found)

    def leaves(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> list[Any]:
        """The leaves :meth:`flat_inputs` gives for these inputs, without capturing anything."""
        return _flattened(args, self._ordered(kwargs))[0]

    def segments(self, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None, *,
                 training: bool | None = None) -> list[Segment]:
        """The segments, in order (the same objects every time: one segment serves every capture), after capturing
        ``model(*args, **kwargs)`` if given."""
        if args is not None:
            self.capture(args, kwargs, training=training)
        if not self._segments:
            raise RuntimeError("no capture yet: pass example inputs, splitter.segments(args, kwargs)")
        return list(self._segments)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` through every segment in turn, in the segments' mode (one process)."""
        live: Any = self.flat_inputs(args, kwargs, training=self._segments[0].training if self._segments else None)
        for segment in self.segments():
            live = segment(live)
        return live

    def _warn_of_written_inputs(self, program: Any, user_inputs: Sequence[Any]) -> None:
        """Warn once per input: the forward writes one of its inputs in place (``labels.masked_fill_(labels == 0,
        -100)``). On one device the caller's tensor, the batch's, changes with it, and the step's code after the model
        reads it so; under a pipeline the segment that writes it gets a copy (received from the last stage, or a
        micro-batch's), and that code reads its own batch, unchanged (found by review: an accuracy over the labels
        not ignored, 0.21 where one device's is 0.26)."""
        graph = program.graph_module.graph
        written = {user_inputs[index].name for index in written_inputs(graph, 0, user_inputs)} - self._written_warned
        if written:
            self._written_warned |= written
            warnings.warn(f"{type(self.model).__name__}.forward writes its input{'s' if len(written) > 1 else ''} "
                          f"{', '.join(sorted(written))} in place (x.masked_fill_(...), x.sub_(...), a "
                          f"Normalize(inplace=True) layer): on one device the batch's tensor changes with it, and "
                          f"code reading it after the model (a metric over the labels) sees the change; under a "
                          f"pipeline the stage writing it holds a copy, so the step's code after the model reads the "
                          f"batch unchanged. Make the op out of place (labels = labels.masked_fill(...)), or do it in "
                          f"the step before calling the model", stacklevel=4)

    def digest(self) -> str:
        """A hash of the first capture's cut, for the ranks of a pipeline to compare (see :attr:`Capture.digest`)."""
        if not self.captures:
            raise RuntimeError("no capture yet: nothing to compare")
        return self.captures[0].digest

    def to(self, device: torch.device | str) -> Splitter:
        """Run the graphs on ``device``: rewrite the device every capture baked in (and move lifted constants).
        Captures made later are rewritten too. Moves no parameter: see :meth:`materialize`."""
        self.device = torch.device(device)
        for capture in self.captures:
            self._retarget(capture)
        return self

    def materialize(self, indices: Iterable[int], device: torch.device | str) -> list[Segment]:
        """Give segments ``indices`` (this rank's) storage on ``device`` and run the graphs there; returns them.

        Meta tensors become uninitialized ones, real ones move; the model and every segment keep referring to the
        same tensors (ties stay one object). Fill the values afterwards (``segment.load_state_dict`` with the
        model's names, or the modules' own initialization)."""
        local = [self.segments()[i] for i in indices]
        materialize(local, [self.model, *self._segments], torch.device(device))
        self.to(device)
        return local

    # -- capturing --------------------------------------------------------------------------------
    def _ordered(self, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        if not kwargs:
            return {}
        order = self._parameter_order
        return dict(sorted(kwargs.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))

    def _capture(self, args: tuple, kwargs: dict[str, Any], training: bool, flat: list[Any]) -> Capture:
        padded = _NestedTensorEncoders(self.model) if not training else None
        modes = self.switches(training)  # as the capture keeps them
        # On meta twins, the trace still says the device the graphs run on (autocast follows it).
        device = self.device if self.device is not None else _device_of(flat)
        meta = (has_meta_state(self.model) or _state_elsewhere(self.model, device) if self.capture_on_meta is None
                else self.capture_on_meta)
        start = time.perf_counter()
        try:
            reads: list[Read] = []
            program, dynamic = export_forward(self.model, args, kwargs, training=training, dynamic=self.dynamic,
                                              meta=meta, allow_autograd_functions=self.allow_autograd_functions,
                                              device=device, fixed_sizes=self._fixed_sizes, reads=reads,
                                              rematerialized=self.rematerialized)
            for read in reads:  # the value the first capture that read it keeps
                self.reads.setdefault((id(read.module), read.name), read)
        finally:
            if padded is not None:
                padded.stop()
        exported = time.perf_counter()
        first = not self.captures
        if first and not self.user_cuts:
            self.cuts = self._chained_cuts(program)
        empty = ("refuse" if self.user_cuts else "drop") if first else "keep"
        layout = lay_out(program, self.cuts, empty=empty, recompute=self.recompute,
                         mode="train" if training else "eval")
        self._warn_of_written_inputs(program, layout.user_inputs)
        programs = build_programs(program, layout, self.model)
        for segment_program in programs:  # a stage defers their running statistics as it does a module's
            defer_batch_norms(segment_program, self.model)
        in_patterns = tuple(pattern_of(node.meta.get("val")) if isinstance(value, torch.Tensor) else ("v", value)
                            for node, value in zip(layout.user_inputs, flat))
        programs[0].live_in = in_patterns
        capture = Capture(training, autocast_state(), dynamic, in_patterns, program.call_spec.in_spec,
                          program.call_spec.out_spec, programs, layout.cuts, device if meta else _device_of(flat),
                          exported - start, time.perf_counter() - exported,
                          rows_meet(list(program.graph.nodes), layout.user_inputs, training) if dynamic else None,
                          modes=modes, example_rows=example_rows(layout.user_inputs),
                          edge_list=edge_list(layout.user_inputs))
        try:  # how its single-number outputs add up over rows: the last stage may put micro-batches' together
            rows = rows_symbols(layout.user_inputs) if dynamic else set()
            fixed = frozenset(  # the sizes the rows may have where the graph fixed them: the inputs' dim 0
                int(value.shape[0]) for value in (node.meta.get("val") for node in layout.user_inputs)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and is_concrete_int(value.shape[0]))
            capture.output_kinds = tuple(output_kinds(program, rows, fixed))
            capture.output_dims = tuple(output_dims(program))
            capture.output_markers = tuple(output_markers(program))
        except Exception:  # noqa: BLE001 - not known: the micro-batches' numbers are not put together
            capture.output_kinds = capture.output_dims = capture.output_markers = None
        try:  # means over a count of the inputs' elements, which the first stage counts per micro-batch
            constants = {node: program.constants[name] for node, (kind, name) in layout.state.items()
                         if kind == "CONSTANT"}
            capture.counted_means = tuple(counted_means(program.graph, layout.user_inputs, constants,
                                                        user_outputs(program)))
        except Exception:  # noqa: BLE001 - not found: not looked for
            capture.counted_means = ()
        capture.mean_losses = tuple(mean_losses([program.graph_module]))
        if self.device is not None:
            self._retarget(capture)
        self.cache.add(capture)
        if first:
            self.cuts = layout.cuts
            # in the first capture's mode, as the model was (a segment picks its graph by its own mode)
            self._segments = [Segment(i, len(programs), self.cache, self.model).train(training)
                              for i in range(len(programs))]
            for segment, segment_program in zip(self._segments, programs):
                segment.adopt(segment_program)
            self._place_unused_state()
        else:
            for segment, segment_program in zip(self._segments, programs):
                segment.adopt(segment_program)
        return capture

    def _chained_cuts(self, program: Any) -> list[Cut]:
        """The default cuts, with a repeated block that holds a ``ModuleList`` (each stage of a PVT or a Hugging Face
        Swin) or an ``nn.Sequential`` (EdgeNeXt's) of blocks run in a chain cut before each of those instead
        (:func:`~.points.listed_blocks`)."""
        blocks = repeated_blocks(self.model)
        lists = chained_lists(program, listed_blocks(self.model, blocks)) if blocks else []
        if not lists:
            return self.cuts
        inner: dict[str, list[str]] = {block: [] for block in blocks}
        for names in lists:
            inner[next(b for b in blocks if names[0].startswith(f"{b}."))].extend(names)
        return block_cuts([name for block in blocks for name in (inner[block] or [block])])

    def _retarget(self, capture: Capture) -> None:
        if self.device is None or capture.device == self.device:
            return
        for program in capture.programs:
            rewrite_devices(program.graph_module, capture.device, self.device)
            program.forget_derived()
            for name, value in program.constants.items():
                program.constants[name] = value.to(self.device)
        capture.device = self.device

    def _place_unused_state(self) -> None:
        """State no graph reads (frozen or unused modules) goes to the segment whose cut encloses its module (else
        the first), so that the segments' ``state_dict``s together are exactly the model's; the model's own (a CLIP
        model's ``logit_scale``, which the step applies to its outputs) to the last, where the step's code after the
        model runs."""
        held = {name for segment in self._segments for name in segment.state_names()}
        self.unread_state = set()
        for kind, named in (("PARAMETER", self.model.named_parameters(remove_duplicate=False)),
                            ("BUFFER", self.model.named_buffers(remove_duplicate=False))):
            for name, _ in list(named):
                if name in held:
                    continue
                owner = 0 if "." in name else len(self._segments) - 1
                for i, (module, where) in enumerate(self.cuts):
                    if name.startswith(module + "."):
                        owner = max(owner, i + 1 if where == "begin" else i)
                self._segments[owner].adopt_state(kind, name)
                self.unread_state.add(name)

    def __repr__(self) -> str:
        cuts = ", ".join(cut_label(c) for c in self.cuts)
        return f"Splitter({type(self.model).__name__}, cuts=[{cuts}], captures={len(self.captures)})"


class _NestedTensorEncoders:
    """Eagerly, an ``nn.TransformerEncoder`` in eval mode given a padding mask runs on nested tensors and gives zeros
    at the padded positions; under ``torch.export`` (as under ``torch.compile``) it computes them. Watches an eval
    capture for such calls, and says so after it."""

    def __init__(self, model: nn.Module) -> None:
        self.names: list[str] = []
        self.handles = [module.register_forward_pre_hook(self._hook(name or type(model).__name__), with_kwargs=True)
                        for name, module in model.named_modules()
                        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)]

    def _hook(self, name: str) -> Any:
        def seen(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
            if mask is not None and name not in self.names:
                self.names.append(name)
        return seen

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self.names:
            warnings.warn(f"{', '.join(self.names)}: an nn.TransformerEncoder built with enable_nested_tensor=True "
                          f"gives, in eval mode with a src_key_padding_mask, zeros at the padded positions when run "
                          f"eagerly, but computes them in a captured graph (as under torch.compile), so evaluation "
                          f"outputs at padded positions differ from one device's. Leave padded positions out where "
                          f"the output is pooled (the unpadded outputs are equal), or build it with "
                          f"enable_nested_tensor=False", stacklevel=4)



def _flattened(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[Any], pytree.TreeSpec]:
    """The pytree leaves and structure of a model call's ``(args, kwargs)``; a dataclass of inputs (``model(Inputs(x,
    mask))``), which export refuses unregistered, registered first, so that its tensors are leaves."""
    while True:
        flat, spec = pytree.tree_flatten((_positional(args), kwargs))
        if not any([register_dataclass(type(leaf)) for leaf in flat if not isinstance(leaf, torch.Tensor)]):
            return flat, spec


def _positional(args: Sequence[Any]) -> tuple:
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"pass the model's positional arguments as a tuple, e.g. (input_ids,), not a "
                        f"{type(args).__name__}")
    return tuple(args)


def _device_of(flat: Sequence[Any]) -> torch.device:
    return next((v.device for v in flat if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _state_elsewhere(model: nn.Module, device: torch.device) -> bool:
    """Whether some of ``model``'s state is on another device than its inputs: a GPU's pipeline keeps the whole model
    where it was built (each rank moves only its own layers) while the batch is already on the GPU; the capture then
    runs on meta twins that say ``device`` (a trace on the real tensors would mix devices)."""
    kind = torch.device(device)
    return any(t.device.type != kind.type or (kind.index is not None and t.device.index not in (None, kind.index))
               for t in (*model.parameters(), *model.buffers()))


def split_model(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any] | None = None,
                split_points: SplitPoints | None = None, **options: Any) -> list[Segment]:
    """``Splitter(model, split_points, **options).segments(args, kwargs)``: the segments of one capture."""
    return Splitter(model, split_points, **options).segments(args, kwargs)
