"""A segment of a captured model: an nn.Module that holds the model's own state objects and runs one cut's program."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .cache import CaptureCache
from .programs import Program

__all__ = ["Segment", "written_inputs"]


class Segment(nn.Module):
    """Segment ``segment_index`` of ``num_segments``: called on the tuple of values live at its cut, it returns the
    tuple live at the next cut; the last one returns the model's own output (a ModelOutput, a tuple, a tensor).

    It registers the model's parameters and buffers that its ops read, the same objects, under the names the model
    gives them (``transformer.h.3.attn.c_attn.weight``), so ``named_parameters()`` and ``state_dict()`` of a
    stage made of segments use the model's names, an optimizer over ``model.parameters()`` steps them, and in-place
    updates (BatchNorm's running statistics) land in the model. A tied parameter is registered by each segment
    that uses it, under the name of the module using it there. State is read at each call, so
    ``torch.func.functional_call(segment, weights, (live,))`` runs on other weights.

    The graph run is picked by the segment's mode (``train()`` / ``eval()``), the modes of the model's modules
    (:meth:`~.splitter.Splitter.follow_modes`), the autocast state and the values given, among the captures made so
    far (:class:`~.splitter.Splitter` makes them).

    No submodule of a segment runs: its modules only hold state. A forward hook on one of them (a zero-bubble
    ``PipelineStage`` puts one on every module that owns parameters) is called with the output of each op that reads
    that module's parameters, as ``hook(module, (), output)``, which is where its weight gradients start.
    """

    keeps_model_names = True  # its modules are registered under the model's names (lightning_pipe.engine.batchnorm)

    def __init__(self, segment_index: int, num_segments: int, cache: CaptureCache, model: nn.Module) -> None:
        super().__init__()
        self.segment_index = segment_index
        self.num_segments = num_segments
        # Not submodules: the segment's state is its own share only, and the model is never moved through it.
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "_model", model)
        self._where: dict[str, tuple[nn.Module, str]] = {}  # state name -> (module of this segment, attribute)
        self._slots: dict[int, list[tuple[Any, str]]] = {}  # id(program) -> where each state argument is read
        self._owners: dict[int, list[tuple[nn.Module, int]]] = {}  # id(program) -> (module, weight op) pairs
        self._written: dict[int, list[int]] = {}  # id(program) -> the live values its ops write in place

    def train(self, mode: bool = True) -> Segment:
        """Pick the graphs of ``mode``; the modules holding the segment's state keep theirs (a batch norm held as
        itself is the model's: its mode is the model's to set, and the graphs follow it)."""
        self.training = mode
        return self

    @property
    def is_last(self) -> bool:
        return self.segment_index == self.num_segments - 1

    def state_names(self) -> list[str]:
        """Names of the parameters and buffers this segment holds (the model's names)."""
        return list(self._where)

    def adopt(self, program: Program) -> None:
        """Register the state ``program`` reads (a capture made after this segment was)."""
        for kind, name in program.state:
            if kind != "CONSTANT":
                self.adopt_state(kind, name)

    def adopt_state(self, kind: str, name: str) -> None:
        """Register the model's parameter (``kind="PARAMETER"``) or buffer ``name`` on this segment, same object,
        same name; a non-persistent buffer stays out of ``state_dict()`` as in the model."""
        if name in self._where:
            return
        *path, leaf = name.split(".")
        source: nn.Module = self._model
        target: nn.Module = self
        for item in path:
            source = getattr(source, item)
            if item not in target._modules:
                # A batch norm's state is held by the model's module itself, not by an empty holder: the stage that
                # runs this segment then finds it and defers its running statistics (see .batchnorm).
                holder = source if isinstance(source, nn.modules.batchnorm._BatchNorm) else nn.Module()
                target.add_module(item, holder)
            target = target._modules[item]
        value = getattr(source, leaf)
        if kind == "PARAMETER":
            target.register_parameter(leaf, value)
        else:
            target.register_buffer(leaf, value, persistent=leaf not in source._non_persistent_buffers_set)
        self._where[name] = (target, leaf)

    def _bind(self, program: Program) -> list[tuple[Any, str]]:
        self.adopt(program)
        slots = [(program.constants, name) if kind == "CONSTANT" else self._where[name]
                 for kind, name in program.state]
        self._slots[id(program)] = slots
        self._written[id(program)] = written_inputs(program.graph_module.graph, len(slots))
        # The modules owning the parameters of each weight op; the segment itself (the model's root parameters, a
        # ViT's class token) is left out: its own hooks fire as any module's do, with its output.
        self._owners[id(program)] = [(module, index) for index, (_, reads) in enumerate(program.weight_ops)
                                     for module in {id(m): m for m in (self._where[n][0] for n in reads)}.values()
                                     if module is not self]
        return slots

    def forward(self, live: tuple) -> Any:
        capture = self._cache.for_segment(self.segment_index, self.training, live)
        program = capture.programs[self.segment_index]
        slots = self._slots.get(id(program))
        if slots is None:
            slots = self._bind(program)
        state = [owner[name] if isinstance(owner, dict) else getattr(owner, name) for owner, name in slots]
        if self._written[id(program)]:  # a value the last segment made, written in place here (a ReLU(inplace=True)
            # first, a PyG-style zeros_like(h).index_add_ cut in between): on a copy where it is a pipeline stage's
            # input, which torch refuses to change in place where it needs a gradient (a leaf)
            live = tuple(value.clone() if index in self._written[id(program)] and value.requires_grad else value
                         for index, value in enumerate(live))
        hooked = [(module, index) for module, index in self._owners[id(program)] if module._forward_hooks]
        if hooked:
            values = program.with_weight_ops()(*state, *live)
            count = len(values) - len(program.weight_ops)
            for module, index in hooked:
                for hook in list(module._forward_hooks.values()):
                    hook(module, (), values[count + index])
            values = values[:count]
        else:
            values = program.graph_module(*state, *live)
        if self.is_last:
            return pytree.tree_unflatten(list(values), capture.out_spec)
        return tuple(values)

    def extra_repr(self) -> str:
        return f"segment {self.segment_index} of {self.num_segments}"


def written_inputs(graph: fx.Graph, skip: int, among: Sequence[fx.Node] | None = None) -> list[int]:
    """The positions among the graph's inputs after the first ``skip`` (its state), or among the placeholders
    ``among``, that one of its ops writes in place (an op whose schema marks that argument written: ``relu_``,
    ``index_add_``)."""
    placeholders = list(among) if among is not None else [node for node in graph.nodes
                                                          if node.op == "placeholder"][skip:]
    position = {node: index for index, node in enumerate(placeholders)}
    written: set[int] = set()
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for argument, value in zip(schema.arguments, node.args):
            if argument.alias_info is not None and argument.alias_info.is_write and value in position:
                written.add(position[value])
    return sorted(written)
