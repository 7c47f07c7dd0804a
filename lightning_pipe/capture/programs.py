"""Build each segment's program: an fx graph of its ops that takes its state, then the values live at its cut."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import ExportedProgram

from .errors import CaptureError
from .graph import Layout, module_paths
from .patterns import Pattern, pattern_of
from .points import cut_label

__all__ = ["Program", "build_programs", "state_aliases"]


@dataclass
class Program:
    """What one segment runs for one capture."""

    graph_module: fx.GraphModule
    """Called as ``graph_module(*state, *live)``; returns the tuple live at the next cut (the last segment: the
    model's flattened output)."""
    state: list[tuple[str, str]]
    """Per state argument: ("PARAMETER" | "BUFFER", its name on the segment, which is a name it has in the model)
    or ("CONSTANT", a key of :attr:`constants`)."""
    live_in: tuple[Pattern, ...]
    """What the values this segment takes look like (sizes ``None`` where symbolic)."""
    ops: tuple[str, ...]
    """The ops it runs, by name, for the digest ranks compare."""
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors the forward made from nothing (``torch.tensor([...])``), lifted by export."""
    weight_ops: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    """Where parameters meet activations: (op, names of the parameters it reads, directly or through views).
    Their outputs are where a split backward's weight half starts (see :meth:`with_weight_ops`)."""
    _with_weight_ops: fx.GraphModule | None = field(default=None, repr=False)

    def with_weight_ops(self) -> fx.GraphModule:
        """The program returning, after its values, the output of every op of :attr:`weight_ops` (built once).

        A zero-bubble schedule splits each backward in two: gradients of the inputs first, of the weights later. The
        weight half starts from the outputs of the modules that own parameters (``PipelineStage`` records them with
        forward hooks), and inside a captured segment no module runs: these ops stand in for them."""
        if self._with_weight_ops is None:
            graph = fx.Graph()
            env: dict[fx.Node, fx.Node] = {}
            values = graph.graph_copy(self.graph_module.graph, env)
            by_name = {node.name: env[node] for node in self.graph_module.graph.nodes if node in env}
            graph.output((*values, *(by_name[name] for name, _ in self.weight_ops)))
            self._with_weight_ops = fx.GraphModule(self.graph_module, graph)
        return self._with_weight_ops

    def forget_derived(self) -> None:
        """Drop what was built from :attr:`graph_module` (after it changed, e.g. its devices were rewritten)."""
        self._with_weight_ops = None

    def fingerprint(self) -> tuple:
        """What must agree for two captures' programs to be interchangeable: their inputs, state and graph, whose
        values' names do not count (two captures of one forward number them apart where one ran more ops before)."""
        return (self.live_in, tuple(self.state), self.ops, _canonical(self.graph_module.graph))


def _canonical(graph: fx.Graph) -> tuple:
    """``graph``'s nodes in order, each as its op, target and arguments, a value given by its node's position."""
    position: dict[fx.Node, int] = {}
    nodes = []
    for index, node in enumerate(graph.nodes):
        position[node] = index
        args = fx.node.map_arg((node.args, node.kwargs), lambda used: ("node", position[used]))
        nodes.append((node.op, "" if node.op == "placeholder" else str(node.target), repr(args)))
    return tuple(nodes)


def state_aliases(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> every name it has in model`` (a tied parameter has one per module that holds it)."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, tensor in (*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)):
        aliases[id(tensor)].append(name)
    return aliases


def build_programs(program: ExportedProgram, layout: Layout, model: nn.Module) -> list[Program]:
    """One :class:`Program` per segment of ``layout``."""
    aliases = state_aliases(model)
    owners = {name: module for name, module in program.graph_module.named_modules()}
    programs = []
    levels = 0  # torch.func.vmap levels entered and not left
    for s in range(layout.num_segments):
        ops = layout.ops_of(s)
        levels += sum(_VMAP_LEVEL.get(getattr(n.target, "__name__", ""), 0) for n in ops
                      if n.op == "call_function" and getattr(n.target, "__module__", None) == _FUNCTORCH_LEVELS)
        if levels and s < layout.num_segments - 1:
            raise CaptureError(
                f"the cut at {cut_label(layout.cuts[s])} falls inside a function run under torch.func.vmap: its "
                f"batched values live in this process's vmap level and cannot cross to another stage. Choose split "
                f"points outside the vmapped code (PipelineStrategy(split_points=[...]), Splitter(split_points=...)), "
                f"so that one stage runs all of it")
        last = s == layout.num_segments - 1
        readers = ops + ([layout.output] if last else [])
        state_nodes: list[fx.Node] = []
        for n in readers:
            for a in n.all_input_nodes:
                if a in layout.state and a not in state_nodes:
                    state_nodes.append(a)
        mine = set(ops)
        state = [_state_name(layout.state[a], [u for u in a.users if u in mine], model, aliases) for a in state_nodes]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in state_nodes + layout.live[s]:
            env[a] = graph.placeholder(a.name)
            env[a].meta = dict(a.meta)
        roots: dict[str, Any] = {}
        for n in ops:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:  # a higher-order op's subgraph: each segment takes its own
                    env[a] = graph.node_copy(a)
                    roots[a.target] = _attr(program.graph_module, a.target, owners)
            env[n] = graph.node_copy(n, env.__getitem__)
        if last:
            results = [env[a] if isinstance(a, fx.Node) else a for a in layout.output.args[0]]
        else:
            results = [_sendable(graph, env[a], a in layout.live[s] or any(u in mine for u in a.users))
                       for a in layout.live[s + 1]]
        graph.output(tuple(results))
        _drop_unread(graph, roots)  # an input-only op that this segment now recomputes may have lost its users
        graph.lint()
        constants = {name: program.constants[name] for kind, name in state if kind == "CONSTANT"}
        names = {a: name for a, (kind, name) in zip(state_nodes, state) if kind == "PARAMETER"}
        alive = {n.name for n in graph.nodes}
        weight_ops = [(env[n].name, reads) for n, reads in _weight_ops(ops, layout, names) if env[n].name in alive]
        programs.append(Program(fx.GraphModule(roots, graph), state,
                                tuple(pattern_of(a.meta.get("val")) for a in layout.live[s]),
                                tuple(_op_label(n) for n in ops), constants, weight_ops))
    return programs


def _weight_ops(ops: list[fx.Node], layout: Layout, names: dict[fx.Node, str]) -> list[tuple[fx.Node, tuple[str, ...]]]:
    """The ops where parameters meet activations, with the parameters each reads (through views such as ``t(W)``
    or ``expand(cls_token)``, which are computed from state alone and so are not where the meeting happens)."""
    reads: dict[fx.Node, set[str]] = {}  # a value computed from state alone -> the parameters it reads
    found = []
    for n in ops:
        inputs = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        from_state = [a for a in inputs if a in layout.state or a in reads]
        if inputs and len(from_state) == len(inputs):
            reads[n] = set().union(*(reads.get(a, {names[a]} if a in names else set()) for a in from_state))
            continue
        params = set().union(*(reads.get(a, {names[a]} if a in names else set()) for a in from_state)) \
            if from_state else set()
        if params and isinstance(n.meta.get("val"), torch.Tensor):
            found.append((n, tuple(sorted(params))))
    return found


def _sendable(graph: fx.Graph, value: fx.Node, used_here: bool) -> fx.Node:
    """A value the segment passes on, as its own tensor object when this segment also reads it (or took it in).

    A stage frees what it has sent by replacing the output tensors' ``.data`` (:meth:`PipelineStage.release_output`),
    which autograd does not notice (it does not bump the version counter): if an op of the stage saved that same
    tensor for backward (a linear reading the code ``z`` that it also passes on), backward would read zeros. An alias
    is a view with its own ``.data``, so freeing it leaves the saved tensor alone; it costs no copy.
    """
    val = value.meta.get("val")
    if not used_here or not isinstance(val, torch.Tensor) or not (val.is_floating_point() or val.is_complex()):
        return value
    alias = graph.call_function(torch.ops.aten.alias.default, (value,))
    alias.meta = dict(value.meta)
    return alias


def _state_name(entry: tuple[str, str], users: list[fx.Node], model: nn.Module,
                aliases: dict[int, list[str]]) -> tuple[str, str]:
    """The name a segment registers a state tensor under. Export routes every use of a tied parameter through one
    of its names (GPT-2's embedding reads ``lm_head.weight``); each segment takes the name of the module that uses
    it there (``transformer.wte.weight`` in the first segment), so stages keep the names the model's modules give."""
    kind, target = entry
    if kind == "CONSTANT":
        return entry
    tensor = model.get_parameter(target) if kind == "PARAMETER" else model.get_buffer(target)
    names = aliases.get(id(tensor), [target])
    if len(names) > 1:
        paths = {p for u in users for p in module_paths(u)}
        for name in names:
            if name.rpartition(".")[0] in paths:
                return kind, name
    return kind, target


# torch.func.vmap's calls in a graph (entering and leaving a vmap level): what they change is functorch's level stack,
# which the batched ops between them read, though no value shows it
_FUNCTORCH_LEVELS = "torch._functorch.predispatch"
_VMAP_LEVEL = {"_vmap_increment_nesting": 1, "_vmap_decrement_nesting": -1}


def _drop_unread(graph: fx.Graph, roots: dict[str, Any]) -> None:
    """Remove the ops whose values nothing reads, but not those run for what they change: torch's impure ops, and a
    higher-order op (a ``torch.no_grad()`` or autocast region, ``roots`` holding its body) whose body changes a buffer
    in place, as an EMA codebook or a call counter does without using the result (``eliminate_dead_code`` would
    drop it: a higher-order op has no schema that says it mutates)."""
    for node in reversed(graph.nodes):
        if node.op in ("call_function", "get_attr") and not node.users and not _has_effects(node, roots):
            graph.erase_node(node)


def _has_effects(node: fx.Node, roots: dict[str, Any]) -> bool:
    if node.op != "call_function":
        return False
    if node.is_impure() or getattr(node.target, "__module__", None) == _FUNCTORCH_LEVELS:
        return True
    if not isinstance(node.target, torch._ops.HigherOrderOperator):
        return False
    bodies = [roots.get(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return any(_has_effects(inner, {name: getattr(body, name, None) for name, _ in body.named_children()})
               for body in bodies if isinstance(body, fx.GraphModule) for inner in body.graph.nodes)


def _attr(root: nn.Module, target: str, owners: dict[str, nn.Module]) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(owners[owner] if owner else root, leaf)


def _op_label(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))
