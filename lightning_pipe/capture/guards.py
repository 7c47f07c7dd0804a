"""Input sizes a symbolic capture holds only some values of: the guards export recorded on them.

Export keeps a size symbolic and records, as guards, the conditions the forward's Python code checked on it: a
chunked scan (Mamba 2's, Bamba's) pads the sequence to a multiple of its chunk and trims the padding only
``if pad_size > 0``, so a capture made from a length that is a multiple of the chunk holds the guard
``length % chunk == 0``, and its graph, run at another length, trims nothing (a wrong shape, or a wrong value). The
graph itself does not check its guards (``ExportedProgram.module()`` would; the segments run the graph directly), and
a guard can hold for every size (most do: what a ``view`` implies) or for some sizes only.

:func:`guarded_sizes` finds the input sizes whose guards do not hold for every size: each size is tried at other
values, the others kept, against the guards that hold at the example's; a size they do not allow everywhere is then
captured fixed, like a length a Python loop runs over, and a new size gets a capture of its own: multiples of a chunk
only, one value only, or up to a size by chunk arithmetic (Mamba 2 captured at 5 tokens serves 2 to 7: one chunk);
not a plain bound (a position table's length, beyond which one device fails too). Which sizes
a model fixes is kept by the splitter and fixed again in its later captures, so that two captures never fix
different sizes (a segment could not tell them apart).
"""

from __future__ import annotations

import inspect
import itertools
import math
import re
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

__all__ = ["guarded_sizes", "size_source"]

# an input's size as a guard names it: L['x'].size()[1], L['batch']['mask'].size()[0], L['batch'].x.size()[1]
_SIZE = re.compile(r"L((?:\[[^\[\]]+\]|\.(?!size\()\w+)+)\.size\(\)\[(\d+)\]")
# sizes tried for each input size: small ones densely (divisibility, chunking), then some powers of two and odd ones
_TRIED = (*range(2, 34), 48, 63, 64, 100, 127, 128, 255, 256, 511, 512, 1000, 1023, 1024, 2048, 4095, 4096)


def size_source(path: str, dim: int) -> str:
    """How a guard names dimension ``dim`` of the input at ``path`` (``pytree.keystr`` of the bound arguments)."""
    return f"L{path}.size()[{dim}]"


def guarded_sizes(program: ExportedProgram, signature: inspect.Signature, args: tuple,
                  kwargs: dict[str, Any]) -> set[tuple[str, int]]:
    """``(path, dim)`` of each input size (``path`` as ``pytree.keystr`` names it in the arguments bound to
    ``signature``) that the guards of ``program`` do not allow at every size (see the module's text); with every input
    size the capture made the same symbol (``labels`` sized as ``input_ids``).

    A guard that names anything other than input sizes, or fails to evaluate, is left out (as the segments have
    always left every guard out); so is one that does not hold at the example's sizes (not understood)."""
    sizes = _input_sizes(signature.bind(*args, **kwargs).arguments)
    if not sizes:
        return set()
    names = {size_source(*where): f"v{index}" for index, where in enumerate(sizes)}
    compiled = []
    for guard in getattr(program, "_guards_code", None) or []:
        code = _SIZE.sub(lambda m: names.get(size_source(m.group(1), int(m.group(2))), m.group(0)), guard)
        if "L[" in code:
            continue
        try:
            compiled.append((compile(code, "<guard>", "eval"), set(re.findall(r"\bv\d+\b", code)), code))
        except SyntaxError:
            continue
    base = {names[size_source(*where)]: value for where, value in sizes.items()}
    namespace = _namespace()
    symbols = _symbols(program, signature)
    # each size the capture kept symbolic, by its variable, with its symbol (every size, each its own symbol, where the
    # program does not bind back): the others never vary
    symbolic = ({names[size_source(*where)]: symbol for where, symbol in symbols.items() if where in sizes}
                if symbols else {name: name for name in base})
    held = [(code, used & set(symbolic), text) for code, used, text in compiled
            if used and _holds(code, namespace, base)]
    together = _tied(held, namespace, {name: base[name] for name in symbolic}, symbolic)
    guarded = {where for where in sizes if (name := names[size_source(*where)]) in symbolic
               and any(name in used for _, used, _ in held) and _varies(name, together, held, namespace, base)}
    tied = {symbols[where] for where in guarded if where in symbols}
    return guarded | {where for where, symbol in symbols.items() if symbol in tied}


def _symbols(program: ExportedProgram, signature: inspect.Signature) -> dict[tuple[str, int], str]:
    """The symbol the capture gave each input size it kept symbolic, by ``(path, dim)``; empty where the program's
    inputs do not bind back to ``signature``."""
    nodes = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    values = []  # the user inputs in order: a placeholder's value, or a constant input itself (a flag)
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            name = getattr(spec.arg, "name", None)
            values.append(nodes[name].meta.get("val") if name in nodes else getattr(spec.arg, "value", None))
    try:
        args, kwargs = pytree.tree_unflatten(values, program.call_spec.in_spec)
        leaves, _ = pytree.tree_flatten_with_path(signature.bind(*args, **kwargs).arguments)
    except Exception:  # noqa: BLE001 - a layout not understood: each guarded size alone
        return {}
    symbols = {}
    for path, value in leaves:
        for dim, size in enumerate(getattr(value, "shape", ()) if isinstance(value, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                symbols[(pytree.keystr(path), dim)] = str(size.node.expr)
    return symbols


def _input_sizes(arguments: dict[str, Any]) -> dict[tuple[str, int], int]:
    """Each tensor input's sizes by ``(path, dim)``."""
    leaves, _ = pytree.tree_flatten_with_path(arguments)
    return {(pytree.keystr(path), dim): int(size) for path, value in leaves if isinstance(value, torch.Tensor)
            for dim, size in enumerate(value.shape)}


def _namespace() -> dict[str, Any]:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    return {**SYMPY_INTERP, "math": math, "inf": float("inf"), "__builtins__": __builtins__}


def _holds(code: Any, namespace: dict[str, Any], values: dict[str, int]) -> bool:
    try:
        return bool(eval(code, namespace, values))  # noqa: S307 - export's own guard text, over sizes only
    except Exception:  # noqa: BLE001 - a guard that fails to evaluate (a division by zero) is not held
        return False


def _tied(held: list[tuple[Any, set[str], str]], namespace: dict[str, Any], base: dict[str, int],
          symbols: dict[str, str]) -> dict[str, set[str]]:
    """Sizes tried together: those the capture made one symbol (``labels`` sized as ``input_ids``), and two equal in
    the example that a guard ties (it fails when either moves alone, for one of them, and holds when both do: a
    target's length as the input's, ``idx.size(0) * idx.size(1) == targets.size(0) * targets.size(1)``)."""
    parent = {name: name for name in base}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    first_of: dict[str, str] = {}
    for name, symbol in symbols.items():
        parent[root(name)] = root(first_of.setdefault(symbol, name))
    for code, used, _ in held:
        for a, b in itertools.combinations(sorted(used), 2):
            if base[a] != base[b] or root(a) == root(b):
                continue
            steps = (base[a] + 1, base[a] + 2)
            if all(_holds(code, namespace, {**base, moved: value}) for moved in (a, b) for value in steps):
                continue  # moving either alone does not break it
            if all(_holds(code, namespace, {**base, a: value, b: value}) for value in steps):
                parent[root(a)] = root(b)
    groups: dict[str, set[str]] = {}
    for name in base:
        groups.setdefault(root(name), set()).add(name)
    return {name: groups[root(name)] for name in base}


def _varies(name: str, together: dict[str, set[str]], held: list[tuple[Any, set[str], str]],
            namespace: dict[str, Any], base: dict[str, int]) -> bool:
    """Whether the guards on ``name`` hold at some sizes only, tried alone and with the sizes tied to it (both ways:
    a size tied to another by a guard holds at its example's value alone only; rows equal to a length in the example,
    tied to it, would show the length's limits)."""
    return _limited({name}, held, namespace, base) and _limited(together[name], held, namespace, base)


def _limited(group: set[str], held: list[tuple[Any, set[str], str]], namespace: dict[str, Any],
             base: dict[str, int]) -> bool:
    """Whether the guards on ``group`` (moved together) fail at some tried size between two at which they hold (a
    multiple of a chunk), hold at one tried size at most, or hold up to some size by chunk arithmetic (``//`` or
    ``%`` in a guard that fails above it: one chunk's fast path). A plain bound (``length <= 32``, where a position
    table ends, beyond which one device fails too) and a smallest size (export takes sizes of 1 as special) are not
    counted."""
    relevant = [(code, text) for code, used, text in held if used & group]

    def failing(value: int) -> list[str]:
        moved = {**base, **dict.fromkeys(group, value)}
        return [text for code, text in relevant if not _holds(code, namespace, moved)]

    results = [not failing(value) for value in _TRIED]
    if results.count(True) <= 1:  # the example's value only, or none tried
        return True
    first, last = results.index(True), len(results) - 1 - results[::-1].index(True)
    if not all(results[first:last + 1]):
        return True
    if last == len(results) - 1:
        return False
    largest = _TRIED[last]  # the largest size allowed, between two tried ones
    while not failing(largest + 1):
        largest += 1
    return any("//" in text or "%" in text for text in failing(largest + 1))
