"""Lay a captured graph out in segments: which segment runs each op, and which values are live at each cut.

A cut is a position in the graph's program order (a topological order): ``(name, "begin")`` is the first op that
module ``name`` runs, ``(name, "end")`` the op after its last. An op belongs to the segment after the cuts at or
before it, so every value flows forward. The values live at cut ``i`` are those defined before it (the model's
inputs count as defined before cut 0) and read at or after it: activations, masks, rope tables, labels, skip
tensors, symbolic sizes, in program order. Parameters and buffers are never live: each segment reads its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from .errors import CaptureError
from .points import Cut, cut_label

__all__ = ["Recompute", "Layout", "lay_out", "module_paths", "chained_lists"]

Recompute = Union[bool, str]
"""Whether a segment recomputes values derived only from the inputs and buffers (masks, position ids, rope tables)
instead of receiving them: ``True``, ``False``, or ``"auto"`` (when such a value is at least a quarter of the
largest parameter-dependent value at that cut, e.g. a B x 1 x T x T mask beside B x T x d activations, T >= d)."""

# Ops that do no work: a segment of only these is empty.
_TRIVIAL = {"getitem", "sym_size.int", "_assert_tensor_metadata.default", "_assert_scalar.default",
            "sym_constrain_range_for_size.default", "sym_constrain_range.default"}
# Ops that must not run twice: recomputing them in another segment would change the result.
_NOT_TWICE = {"dropout.default", "native_dropout.default", "rand.default", "randn.default", "randint.low",
              "randint.default", "rand_like.default", "randn_like.default", "randint_like.default", "bernoulli.p",
              "bernoulli.default", "multinomial.default", "normal.Tensor_float", "normal.float_Tensor",
              "uniform_.default", "normal_.default", "randperm.default", "exponential_.default"}
_UNKNOWN_SIZE = 1 << 40  # the byte size of a value whose sizes have no hint


@dataclass
class Layout:
    """One captured graph, laid out in segments."""

    nodes: list[fx.Node]
    """Every node, in program order."""
    user_inputs: list[fx.Node]
    """Placeholders of the model's inputs (the flattened ``(args, kwargs)``), in order."""
    state: dict[fx.Node, tuple[str, str]]
    """Placeholder -> ("PARAMETER" | "BUFFER" | "CONSTANT", its name in the model or the constants table)."""
    cuts: list[Cut]
    """The cuts in use (default cuts that would leave a segment empty are dropped)."""
    segment_of: dict[fx.Node, int]
    """The segment that runs each op (inputs: 0; output: the last)."""
    live: list[list[fx.Node]]
    """``live[i]``: the values segment ``i`` takes, in program order (``live[0]``: the model's inputs)."""
    copies: dict[int, list[fx.Node]] = field(default_factory=dict)
    """Ops a segment runs again rather than receive their values (see :data:`Recompute`)."""

    @property
    def num_segments(self) -> int:
        return len(self.cuts) + 1

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    def ops_of(self, segment: int) -> list[fx.Node]:
        """The ops segment ``segment`` runs, recomputed ones included, in program order."""
        order = {n: i for i, n in enumerate(self.nodes)}
        mine = [n for n in self.nodes if self.segment_of.get(n) == segment and n.op == "call_function"]
        return sorted(mine + self.copies.get(segment, []), key=order.__getitem__)


def module_paths(node: fx.Node) -> list[str]:
    """Names of the modules whose forward was running when ``node``'s op was called, outermost first."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def chained_lists(program: ExportedProgram, lists: Sequence[Sequence[str]]) -> list[list[str]]:
    """Those of ``lists`` (each a ModuleList's members, by name) whose called members run in a chain: each one's ops
    read what the one called before it computed (a stage's transformer blocks), rather than side by side (a
    mixture's experts, each reading the same input). Each list is returned as its called members, in call order."""
    nodes = list(program.graph_module.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    wanted = {name for names in lists for name in names}
    ops: dict[str, set[fx.Node]] = defaultdict(set)
    for node in nodes:
        if node.op == "call_function":
            for path in module_paths(node):
                if path in wanted:
                    ops[path].add(node)
    chained = []
    for names in lists:
        called = sorted((name for name in names if ops[name]), key=lambda name: min(map(position.__getitem__,
                                                                                        ops[name])))
        if len(called) >= 2 and all(_reaches(ops[a], ops[b], position) for a, b in zip(called, called[1:])):
            chained.append(called)
    return chained


def _reaches(sources: set[fx.Node], targets: set[fx.Node], position: dict[fx.Node, int]) -> bool:
    """Whether a value computed by ``sources`` flows into one of ``targets``."""
    limit = max(map(position.__getitem__, targets))
    stack, seen = list(sources), set(sources)
    while stack:
        for user in stack.pop().users:
            if user in targets:
                return True
            if user not in seen and position[user] <= limit:
                seen.add(user)
                stack.append(user)
    return False


def lay_out(program: ExportedProgram, cuts: Sequence[Cut], *, empty: str, recompute: Recompute,
            mode: str) -> Layout:
    """Lay ``program`` out at ``cuts``. ``empty`` says what to do with a segment that would have no work:
    ``"drop"`` its cut (default cuts), ``"refuse"`` (the user's own) or ``"keep"`` it (a later capture, which must
    cut where the first one did)."""
    signature = program.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
        kinds = sorted({spec.kind.name for spec in signature.output_specs if spec.kind != OutputKind.USER_OUTPUT})
        raise CaptureError(f"the captured graph returns state updates ({', '.join(kinds)}) instead of making them in "
                           f"place; this torch version's export is not supported by the capture")
    nodes = list(program.graph_module.graph.nodes)
    user_inputs, state = _inputs(nodes, signature)
    position = {n: i for i, n in enumerate(nodes)}
    body = [n for n in nodes if n.op == "call_function"]
    cuts = list(cuts)
    spans = _spans(body, position)
    called = spans[0]
    if empty == "drop":  # default cuts: in the order forward calls the blocks (CLIP runs its vision tower first),
        cuts = [cut for cut in _in_call_order(spans, cuts) if cut[0] in called]  # the called ones
    # A later capture cuts where the first one did, and the user's cuts hold in an evaluation that comes first (a
    # sanity check): there, a module this mode does not call leaves its segment empty.
    uncalled_empty = empty == "keep" or (empty == "refuse" and mode == "eval")
    while True:
        starts = _starts(spans, position[body[-1]] + 1 if body else 0, cuts, mode, uncalled_empty=uncalled_empty)
        segment_of = {n: sum(position[n] >= s for s in starts) for n in body}
        work = defaultdict(int)
        for n in body:
            work[segment_of[n]] += _op_name(n) not in _TRIVIAL
        idle = [i for i in range(len(cuts) + 1) if work[i] == 0 and (i == 0 or cuts[i - 1][0] in called)]
        if not idle or empty == "keep":
            break
        if empty == "refuse":
            raise CaptureError(f"split points {[cut_label(c) for c in cuts]} leave segment(s) {idle} without any "
                               f"computation ({mode} mode); drop or move the split points around them")
        cuts.pop(min(idle[0], len(cuts) - 1))  # merge the idle segment into a neighbour
    for n in body:  # a part of an op's tuple (a no_grad region's outputs) is taken where the op runs: no segment
        source = n.args[0] if n.args else None  # receives a tuple, which no transport carries
        if _op_name(n) == "getitem" and isinstance(source, fx.Node) and source in segment_of \
                and not isinstance(source.meta.get("val"), torch.Tensor):
            segment_of[n] = segment_of[source]
    for n in user_inputs:
        segment_of[n] = 0
    segment_of[nodes[-1]] = len(cuts)
    layout = Layout(nodes, user_inputs, state, cuts, segment_of, [])
    layout.live = _liveness(layout, {})
    if recompute:
        layout.copies = _recomputed(layout, recompute)
        layout.live = _liveness(layout, layout.copies)
    return layout


def _inputs(nodes: list[fx.Node], signature) -> tuple[list[fx.Node], dict[fx.Node, tuple[str, str]]]:
    user_inputs: list[fx.Node] = []
    state: dict[fx.Node, tuple[str, str]] = {}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(node)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            state[node] = (spec.kind.name, spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            state[node] = ("CONSTANT", spec.target)
        elif "Generator" in str(spec.arg):
            raise CaptureError("the model draws random numbers from a torch.Generator it keeps (torch.rand(..., "
                               "generator=self.g)), which the captured graph would take as an input that segments "
                               "cannot carry: draw from torch's global generator instead (drop generator=); the "
                               "pipeline forks it for each micro-batch from a seed every rank shares")
        else:
            raise CaptureError(f"the captured graph takes a {spec.kind.name} input ({spec.arg}), which segments "
                               f"cannot carry; capture a forward without script objects or effect tokens")
    return user_inputs, state


def _spans(body: list[fx.Node], position: dict[fx.Node, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Each module's first and last op position (a container forward never calls, a ModuleList of blocks, spans the
    ops of the modules under it)."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for node in body:
        for path in module_paths(node):
            parts = path.split(".")
            for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
                first.setdefault(prefix, position[node])
                last[prefix] = position[node]
    return first, last


def _in_call_order(spans: tuple[dict[str, int], dict[str, int]], cuts: list[Cut]) -> list[Cut]:
    """``cuts`` sorted by where they cut (a module forward never calls comes first, keeping its order)."""
    first, last = spans

    def where(index: int) -> tuple[int, int]:
        name, side = cuts[index]
        if name not in first:
            return (-1, index)
        return (first[name] if side == "begin" else last[name] + 1, index)

    return [cuts[i] for i in sorted(range(len(cuts)), key=where)]


def _starts(spans: tuple[dict[str, int], dict[str, int]], end: int, cuts: list[Cut], mode: str,
            uncalled_empty: bool) -> list[int]:
    """Where each cut starts its segment. With ``uncalled_empty``, a module this mode does not call (an auxiliary
    head that runs in training only) cuts where the next cut does: its segment is empty in this mode and passes its
    values on. ``end``: the position after the last op."""
    first, last = spans
    starts: list[int | None] = []
    for name, where in cuts:
        if name in first:
            starts.append(first[name] if where == "begin" else last[name] + 1)
        elif uncalled_empty:
            starts.append(None)
        else:
            raise CaptureError(f"split point {name!r}: forward never calls that module ({mode} mode), or it runs no "
                               f"op; name a module that forward calls")
    following = end
    for index in reversed(range(len(starts))):
        if starts[index] is None:
            starts[index] = following
        following = starts[index]
    for (a, start_a), (b, start_b) in zip(zip(cuts, starts), zip(cuts[1:], starts[1:])):
        if start_b < start_a:
            raise CaptureError(f"split points {[cut_label(c) for c in cuts]} are not in the order forward calls them: "
                               f"{cut_label(b)!r} comes before {cut_label(a)!r}; list them in call order")
    return starts


def _liveness(layout: Layout, copies: dict[int, list[fx.Node]]) -> list[list[fx.Node]]:
    """The values live at each cut, given the ops each segment recomputes."""
    count = layout.num_segments
    readers: dict[fx.Node, int] = {}  # value -> last segment that reads it from outside
    for s in range(count):
        mine = set(n for n in layout.nodes if layout.segment_of.get(n) == s and n.op == "call_function")
        mine.update(copies.get(s, []))
        users = list(mine) + ([layout.output] if s == count - 1 else [])
        for n in users:
            for a in n.all_input_nodes:
                if a in mine or a in layout.state or a.op == "get_attr" or (s == 0 and a.op == "placeholder"):
                    continue
                readers[a] = max(readers.get(a, -1), s)
    live: list[list[fx.Node]] = [list(layout.user_inputs)] + [[] for _ in range(count - 1)]
    for n in layout.nodes:
        if n in readers:
            for i in range(layout.segment_of[n] + 1, readers[n] + 1):
                live[i].append(n)
    return live


def _recomputed(layout: Layout, policy: Recompute) -> dict[int, list[fx.Node]]:
    """Per segment, the input-only ops it runs again instead of receiving their values (see :data:`Recompute`)."""
    input_only: dict[fx.Node, bool] = {}
    written = _written(layout.nodes)
    for n in layout.nodes:
        if n.op == "placeholder":
            input_only[n] = n in layout.user_inputs or layout.state[n][0] != "PARAMETER"
        elif n.op == "call_function":
            schema = getattr(n.target, "_schema", None)
            input_only[n] = (all(input_only.get(a, False) for a in n.all_input_nodes)
                             and _op_name(n) not in _NOT_TWICE and "batch_norm" not in _op_name(n)
                             and not (schema is not None and schema.is_mutable) and n not in written)
    copies: dict[int, list[fx.Node]] = defaultdict(list)
    for s in range(1, layout.num_segments):
        largest = max([_nbytes(a) for a in layout.live[s] if not input_only.get(a, False)] or [0])
        for n in layout.live[s]:
            if n.op == "placeholder" or not input_only.get(n, False):
                continue
            if policy is True or _nbytes(n) * 4 >= largest:
                stack = [n]
                while stack:
                    m = stack.pop()
                    if m.op != "call_function" or m in copies[s] or layout.segment_of.get(m) == s:
                        continue
                    copies[s].append(m)
                    stack.extend(m.all_input_nodes)
    return dict(copies)


def _written(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    """The values an op of the graph writes in place, and those they are views of: a tensor made in forward and
    filled through a slice (``out = torch.zeros(...); out[:, :k] = h``) is not the factory's value any more, so no
    segment may make it again."""
    written: set[fx.Node] = set()
    for n in nodes:
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for argument, value in _arguments(n, schema):
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
                written.add(value)
    stack = list(written)
    while stack:  # through views to what they view
        base = _viewed(stack.pop())
        if base is not None and base not in written:
            written.add(base)
            stack.append(base)
    return written


def _viewed(node: fx.Node) -> fx.Node | None:
    """The value ``node`` is a view of (its op's output aliases an input: slice, view, transpose), else None."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    for argument, value in _arguments(node, schema):
        if argument.alias_info is not None and isinstance(value, fx.Node):
            return value
    return None


def _arguments(node: fx.Node, schema: torch.FunctionSchema) -> list[tuple[torch.Argument, object]]:
    """The ``(schema argument, value)`` pairs of ``node``'s call, positional and keyword."""
    pairs = list(zip(schema.arguments, node.args))
    return pairs + [(argument, node.kwargs[argument.name]) for argument in schema.arguments[len(node.args):]
                    if argument.name in node.kwargs]


def _nbytes(node: fx.Node) -> int:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return 0
    numel = value.numel()
    # The example's size, read from the symbol's hint: int() would guard, fixing the symbols to the example's sizes
    # for good (a capture of a batch of 2 rows would then serve only 2).
    hint = numel.node.hint if isinstance(numel, torch.SymInt) else numel
    return int(hint) * value.element_size() if isinstance(hint, int) else _UNKNOWN_SIZE


def _op_name(node: fx.Node) -> str:
    target = node.target
    if getattr(target, "__name__", None) == "getitem":
        return "getitem"
    overload = getattr(target, "_overloadname", None)
    return getattr(target, "_opname", str(target)) + (f".{overload}" if overload is not None else "")
