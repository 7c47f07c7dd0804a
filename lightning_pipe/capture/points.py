"""Where a captured forward is cut: the default cut points (around repeated blocks) and the user's split points."""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch.nn as nn
from torch.nn.utils import parametrize

__all__ = ["SplitPoint", "SplitPoints", "Cut", "repeated_blocks", "listed_blocks", "default_cuts", "block_cuts",
           "normalize_split_points", "cut_label"]

SplitPoint = Union[str, tuple[str, str]]
"""``"blocks.3"`` (cut before the module's first op) or ``("blocks.3", "end")`` (cut after its last op)."""
SplitPoints = Union[Sequence[SplitPoint], Mapping[str, Any]]
"""A list of :data:`SplitPoint`, or ``{name: "begin" | "end"}`` (``torch.distributed.pipelining``'s
``SplitPoint.BEGINNING`` / ``SplitPoint.END`` are taken too)."""
Cut = tuple[str, str]
"""A normalized split point: ``(module name, "begin" | "end")``."""

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_ENCLOSING_SHARE = 0.9  # a class enclosing the repeated one wins when its instances hold >= 90% as many parameters


class _PlainBlock:
    """The census' class of plain ``nn.Sequential`` blocks in a container (a VGG's convolution, norm and activation
    in each ``nn.Sequential(...)`` of its features; ConvMixer's blocks): blocks without a class of their own, counted
    only in a model without such blocks of a class of their own."""


def _kind(child: nn.Module, parent: nn.Module) -> type:
    """``child``'s class in the census: :class:`_PlainBlock` for the innermost plain ``nn.Sequential`` blocks in a
    container (one holding such blocks is a stage of them: its blocks are the units)."""
    if _plain(child) and isinstance(parent, (nn.Sequential, nn.ModuleList)) and not any(map(_plain, child.children())):
        return _PlainBlock
    if parametrize.is_parametrized(child):  # a class made for each instance (ParametrizedLinear): its layer's class
        return type(child).__bases__[0]
    return type(child)


def _plain(module: nn.Module) -> bool:
    return type(module) is nn.Sequential and len(module) >= 2


@dataclass
class _Census:
    """Modules that sit beside at least one sibling of their own class (containers excluded, but plain
    ``nn.Sequential`` blocks in a container: :class:`_PlainBlock`), by class."""

    total: dict[type, int] = field(default_factory=lambda: defaultdict(int))  # their parameters, all instances
    members: dict[type, list[str]] = field(default_factory=lambda: defaultdict(list))  # their names
    listed: set[type] = field(default_factory=set)  # instances in a container that holds that class alone
    chained: set[type] = field(default_factory=set)  # the same, in an nn.Sequential (calls them in turn), composite
    composite: dict[type, bool] = field(default_factory=dict)  # instances hold modules of their own (blocks)
    lists: dict[type, list[list[str]]] = field(default_factory=lambda: defaultdict(list))  # their ModuleLists' names


def _census(model: nn.Module) -> _Census:
    census = _Census()
    for parent_name, parent in model.named_modules():
        by_class: dict[type, list[tuple[str, nn.Module]]] = defaultdict(list)
        for child_name, child in parent.named_children():
            by_class[_kind(child, parent)].append((f"{parent_name}.{child_name}" if parent_name else child_name, child))
        for cls, children in by_class.items():
            if len(children) < 2 or issubclass(cls, _CONTAINERS):
                continue
            for name, child in children:
                census.composite[cls] = census.composite.get(cls, False) or any(True for _ in child.children())
                census.total[cls] += sum(p.numel() for p in child.parameters())
                census.members[cls].append(name)
            if isinstance(parent, _CONTAINERS) and len(by_class) == 1:
                census.listed.add(cls)
                if isinstance(parent, nn.Sequential) and census.composite[cls]:
                    census.chained.add(cls)
                elif isinstance(parent, nn.ModuleList):
                    census.lists[cls].append([name for name, _ in children])
    if any(composite for cls, composite in census.composite.items() if cls is not _PlainBlock):
        # blocks of a class of their own are the author's units (timm's SelecSLS head, HRNet's parallel branches
        # are plain nn.Sequential blocks beside them)
        for table in (census.total, census.members, census.composite, census.lists):
            table.pop(_PlainBlock, None)
        census.listed.discard(_PlainBlock)
        census.chained.discard(_PlainBlock)
    return census


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, in ``named_modules`` order.

    Among modules that sit beside at least one sibling of their own class (containers excluded; plain
    ``nn.Sequential`` blocks in a container count as one class), the class whose such
    instances hold the most parameters ("the largest ModuleList" alone would pick a ResNet's last stage, or an
    autoencoder's decoder). Outermost instances only. Then:

    - a class enclosing those instances wins if it holds >= 90% as many (a transformer block over its Linears);
    - a layer class (no submodules: a Conv2d) yields to the largest block class enclosing its instances that holds
      half as many (EfficientNet's blocks, whose convolutions also sit in the stem and the head);
    - a winner steps down to a class it encloses, holding half its parameters, that sits alone in containers:
      when the winner's instances are attributes (T5's encoder and decoder stacks: each stack's ``block`` list), or
      when an ``nn.Sequential`` chains them (the blocks in each stage of ConvNeXt, Swin, PoolFormer: four stages are
      too few units to balance). Not a ``ModuleList`` inside a listed winner: it may hold a mixture's experts, which
      run side by side; the capture steps down into those where its graph shows that they run in a chain
      (:func:`listed_blocks`).
    """
    census = _census(model)
    total, members, composite = census.total, census.members, census.composite
    if not total:
        return []
    best = max(total, key=total.__getitem__)
    for cls, size in total.items():
        encloses = any(_inside(m, members[cls]) for m in members[best])
        if cls is not best and encloses and size >= _ENCLOSING_SHARE * total[best]:
            best = cls
    if not composite[best]:  # layers (a Conv2d) win only where no block of them holds half as many parameters
        blocks = [cls for cls in total if composite[cls] and total[cls] >= 0.5 * total[best]
                  and any(_inside(m, members[cls]) for m in members[best])]
        if blocks:
            best = max(blocks, key=total.__getitem__)
    while True:  # step down to the blocks inside the winner (see above)
        inside = [cls for cls in (census.listed if best not in census.listed else census.chained)
                  if total[cls] >= 0.5 * total[best] and cls is not best
                  and all(_inside(m, members[best]) for m in members[cls])]
        if not inside:
            break
        best = max(inside, key=total.__getitem__)
    names = members[best]
    return [n for n in names if not _inside(n, names)]


def listed_blocks(model: nn.Module, blocks: Sequence[str]) -> list[list[str]]:
    """Containers inside the repeated ``blocks`` whose members are blocks holding half the blocks' parameters, each
    as its members' names: candidates to cut at, if they run in a chain. The ModuleLists that hold, alone, instances
    of one composite class (each stage's list of transformer blocks in a PVT or a Hugging Face Swin; or a mixture's
    experts); else the ``nn.Sequential`` containers of blocks of several classes (EdgeNeXt's convolution blocks, then an
    attention block, in each stage)."""
    census = _census(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    blocks_total = sum(p.numel() for name in blocks for p in modules[name].parameters())
    candidates = [cls for cls, lists in census.lists.items() if census.composite[cls]
                  and census.total[cls] >= 0.5 * blocks_total
                  and all(_inside(m, blocks) for m in census.members[cls])]
    if candidates:
        return census.lists[max(candidates, key=census.total.__getitem__)]
    sequences = [[f"{name}.{child}" for child, _ in module.named_children()] for name, module in modules.items()
                 if type(module) is nn.Sequential and _inside(name, blocks) and len(module) >= 2
                 and all(any(True for _ in child.children()) for child in module.children())]
    sequences = [names for names in sequences if not any(_inside(names[0], other) for other in sequences)]
    held = sum(p.numel() for names in sequences for name in names for p in modules[name].parameters())
    return sequences if held >= 0.5 * blocks_total else []


def _inside(name: str, outer: Sequence[str]) -> bool:
    """Whether the module ``name`` lies inside one of the modules ``outer``."""
    return any(name.startswith(o + ".") for o in outer)


def default_cuts(model: nn.Module) -> list[Cut]:
    """A cut before every repeated block and one after the last, so that the stem and the head are units of
    their own (a planner can give a large LM head a stage); without repeated blocks, before every top-level
    child but the first. Cuts that would leave a segment without computation are dropped at capture."""
    blocks = repeated_blocks(model)
    if blocks:
        return block_cuts(blocks)
    return [(name, "begin") for name, _ in list(model.named_children())[1:]]


def block_cuts(blocks: Sequence[str]) -> list[Cut]:
    """A cut before every block and one after the last."""
    return [(name, "begin") for name in blocks] + [(blocks[-1], "end")]


def normalize_split_points(model: nn.Module, points: SplitPoints) -> list[Cut]:
    """``points`` as ``(name, "begin" | "end")`` pairs, each naming a submodule of ``model``.

    The order is checked at capture, against the order forward calls the modules in.
    """
    if isinstance(points, Mapping):
        items = [(name, _where(name, kind)) for name, kind in points.items()]
    elif isinstance(points, str) or (isinstance(points, tuple) and len(points) == 2 and points[1] in ("begin", "end")):
        raise TypeError(f"split_points must be a list of names (or (name, 'end') pairs) or a dict, got "
                        f"{points!r}; e.g. split_points=[{points!r}]")
    else:
        items = []
        for point in points:
            if isinstance(point, str):
                items.append((point, "begin"))
            elif isinstance(point, tuple) and len(point) == 2 and isinstance(point[0], str):
                items.append((point[0], _where(point[0], point[1])))
            else:
                raise TypeError(f"split point {point!r}: give a module name ('blocks.3', cut before it) or a pair "
                                f"('blocks.3', 'end') (cut after it)")
    names = {name for name, _ in model.named_modules(remove_duplicate=False) if name}
    for name, _ in items:
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3)
            hint = f" (close: {', '.join(map(repr, close))})" if close else ""
            raise ValueError(f"split point {name!r}: {type(model).__name__} has no submodule of that name{hint}; "
                             f"name modules as model.named_modules() does, e.g. {_example(model)!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"split points {[cut_label(c) for c in items]} name one cut twice; give each once")
    return items


def cut_label(cut: Cut) -> str:
    """``"blocks.3"`` or ``"blocks.3:end"``, for messages and digests."""
    return cut[0] if cut[1] == "begin" else f"{cut[0]}:end"


def _where(name: str, kind: Any) -> str:
    kind = getattr(kind, "name", kind)  # torch.distributed.pipelining.SplitPoint.BEGINNING / .END
    if isinstance(kind, str) and kind.lower() in ("begin", "beginning", "start"):
        return "begin"
    if isinstance(kind, str) and kind.lower() == "end":
        return "end"
    raise ValueError(f"split point {name!r}: {kind!r} is neither 'begin' nor 'end'")


def _example(model: nn.Module) -> str:
    blocks = repeated_blocks(model)
    return blocks[len(blocks) // 2] if blocks else next((n for n, _ in model.named_children()), "layer")
