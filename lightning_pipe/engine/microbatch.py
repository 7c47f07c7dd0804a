"""Split a batch into micro-batches along dim 0, and weight their losses so the sum is the batch mean."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

from .tree import dataclass_part, dataclass_values, rebuild_mapping, tree_flatten

__all__ = ["batch_rows", "split_batch", "owned", "microbatch_weights", "per_row_lists"]

_PLAIN = (str, bytes, int, float, bool, type(None))  # values that hold no tensor


def batch_rows(batch: Any, microbatch: bool = False) -> int:
    """The number of rows of ``batch``: the size of dim 0 its tensors share, leaving out the lists that hold one item
    per row (see :func:`split_batch`). A ``microbatch`` was read as part of its batch already: nothing is said of it
    (its per-image targets may happen to have as many boxes each as it has images)."""
    return _read(batch, warn=not microbatch)[0]


@dataclasses.dataclass
class _Lists:
    """The lists and tuples of a batch whose items hold tensors and are alike (all tensors of one dtype and number of
    dimensions, or all mappings with the same keys): each may hold one item per row rather than columns."""

    of_mappings: list[Any] = dataclasses.field(default_factory=list)
    of_tensors: list[Any] = dataclasses.field(default_factory=list)


def _read(batch: Any, warn: bool = True) -> tuple[int, set[int]]:
    """``(rows, ids of the lists split item by item)``.

    When every tensor has the same size along dim 0, that is the rows, and every list is a container of columns (the
    ``[x, y]`` a ``TensorDataset`` collates), as it always was. Otherwise the rows are those of the tensors outside
    the lists whose items are alike (stacked images beside their targets), and such a list holds one item per row
    when it has that many items and some of its tensors do not have that many rows: per-image targets
    (``[{"boxes": ..., "labels": ...}, ...]`` with a box count of their own each), ragged sequences. A micro-batch
    keeps those tensors, so it reads the same way. A batch of such lists alone (torchvision's ``tuple(zip(*batch))``
    of images of several sizes) has no rows to read and is refused."""
    leaves = tree_flatten(batch)[0]
    _refuse_packed(batch, leaves)
    sizes = {t.shape[0] for t in leaves if t.dim() > 0}
    if not sizes:
        hidden = _hidden_tensors(batch)
        if hidden is not None and _graph_batch(batch):
            raise ValueError(f"cannot split a batch of {hidden} into micro-batches, nor read its rows (also "
                             f"with num_microbatches=1, where the pipeline still reads the batch's tensors to check "
                             f"and place them): a pipeline splits a batch's tensors along their rows (dim 0). "
                             f"{_GRAPH_ADVICE}")
        if hidden is not None:
            raise ValueError(f"cannot split a batch of {hidden} (a class of its own) into micro-batches: a pipeline "
                             f"splits a batch's tensors along their rows (dim 0) in tensors, tuples, lists, dicts, "
                             f"NamedTuples and dataclasses, and cannot see those this class holds. Make it a "
                             f"dataclass (@dataclasses.dataclass: each field is split and the "
                             f"class rebuilt), or have the collate_fn return a dict or a tuple")
        raise ValueError("cannot split a batch without tensors (of at least one dimension) into micro-batches: a "
                         "pipeline step splits every batch along its rows (dim 0). A batch of single numbers (a "
                         "DataLoader with batch_size=None over items of 0-dim tensors) has no rows: give the "
                         "DataLoader a batch_size, or make each item a tensor of rows")
    lists = _Lists()
    _find_lists(batch, lists)
    if len(sizes) == 1:
        rows = sizes.pop()
        if warn:
            _warn_if_dicts_could_be_rows(lists, rows)
        return rows, set()
    candidates = lists.of_mappings + lists.of_tensors
    anchors = {t.shape[0] for t in _outside(batch, {id(c) for c in candidates}) if t.dim() > 0}
    if len(anchors) == 1:
        rows = anchors.pop()
        per_row = {id(c) for c in candidates
                   if len(c) == rows and any(t.dim() == 0 or t.shape[0] != rows for t in tree_flatten(c)[0])}
        if all(t.dim() == 0 or t.shape[0] == rows for t in _outside(batch, per_row)):
            return rows, per_row
    shapes = [tuple(t.shape) for t in leaves]
    common = max(sorted(sizes), key=lambda size: sum(t.dim() > 0 and t.shape[0] == size for t in leaves))
    odd = ", ".join([f"{path} {tuple(t.shape)}" for path, t in _named_tensors(batch, "batch")
                     if t.dim() > 0 and t.shape[0] != common][:4])
    raise ValueError(
        f"every tensor of a batch must have the same size along dim 0 to be split into micro-batches, apart from "
        f"lists with one item (a tensor or a dict of them) per row beside a tensor of the batch's rows (stacked "
        f"images beside their targets); got shapes {shapes}"
        f"{f' ({odd} beside {common} rows elsewhere)' if odd else ''}. {_several_loaders(batch)}"
        f"{_graphs(leaves)}{_offsets(leaves)}{_time_major(leaves)}Put per-batch constants in a 0-dim tensor or a "
        f"non-tensor value, and a per-batch vector (class weights) on the module or in the step; stack or pad the "
        f"rows' tensors in the collate_fn.")


def _refuse_packed(batch: Any, leaves: list[Any]) -> None:
    """A ``PackedSequence`` (its data interleaves the rows' steps) or a nested tensor has no dim 0 of rows to split:
    refused, saying what to give instead (found by review: a bare shapes message, and torch's "slice(): not
    supported for NestedTensor")."""
    packed = any(isinstance(t, PackedSequence) for t in _walk(batch))
    nested = any(isinstance(t, torch.Tensor) and t.is_nested for t in leaves)
    if packed or nested:
        what = "a PackedSequence" if packed else "a nested tensor"
        raise ValueError(f"cannot split a batch holding {what} into micro-batches: a pipeline splits a batch along "
                         f"its rows (dim 0), which {what} does not lay out. Have the collate_fn give the sequences as "
                         f"a list of tensors, one per row, beside a tensor of the rows (their labels, or their "
                         f"lengths): each micro-batch gets its rows' sequences; pad them in the step "
                         f"(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)), or pad them in the collate_fn "
                         f"with a mask or the lengths, and read each row's last step by its length")


def _named_tensors(tree: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``tree`` in dicts, lists and tuples, each with its path (``batch['cw']``)."""
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _named_tensors(value, f"{path}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _named_tensors(value, f"{path}[{index}]")


def _walk(tree: Any) -> Iterator[Any]:
    yield tree
    if not isinstance(tree, PackedSequence):
        for child in _children(tree):
            yield from _walk(child)


def _hidden_tensors(tree: Any) -> str | None:
    """The class name of an object in ``tree`` that holds tensors in attributes no tree walk reads (a batch class of
    the user's own, with a ``.to()`` for Lightning's device transfer), else None."""
    if isinstance(tree, torch.Tensor) or type(tree) in _PLAIN:
        return None
    children = _children(tree)
    if not children and hasattr(tree, "__dict__") and not isinstance(tree, type) \
            and tree_flatten(list(vars(tree).values()))[0]:
        return type(tree).__name__
    return next((name for child in children if (name := _hidden_tensors(child)) is not None), None)


def _graphs(leaves: list[torch.Tensor]) -> str:
    """Advice for a batch of graphs as PyTorch Geometric collates them: an integer ``(2, edges)`` edge list."""
    if not any(t.dim() == 2 and t.shape[0] == 2 and not t.is_floating_point() and t.shape[1] != 2 for t in leaves):
        return ""
    return _GRAPH_ADVICE


def _graph_batch(tree: Any) -> bool:
    """Whether ``tree`` holds PyTorch Geometric's batch of graphs (its loader's ``DataBatch``: ``num_graphs`` and an
    ``edge_index``), whose class hides its tensors."""
    if isinstance(tree, torch.Tensor) or type(tree) in _PLAIN:
        return False
    if hasattr(tree, "num_graphs") and isinstance(getattr(tree, "edge_index", None), torch.Tensor):
        return True
    return any(_graph_batch(child) for child in _children(tree))


_GRAPH_ADVICE = (
    "It looks like a batch of graphs (PyTorch Geometric's: every graph's nodes stacked, a (2, edges) edge_index, a "
    "vector naming each node's graph), whose rows are not along any dim: have the collate_fn give a list of the "
    "graphs, each a dict of its tensors (data.to_dict()), beside their labels (a micro-batch then holds whole graphs) "
    "and put them together in the step (torch_geometric.data.Batch.from_data_list of Data(**graph) for each; the "
    "sparse layers run unchanged; give pooling and scatter the number of graphs, which a captured model cannot read "
    "from the batch vector, as the length of a tensor, so that it may differ between micro-batches: pass "
    "torch.arange(len(graphs)) to the model and call global_mean_pool(h, batch, size=graph_ids.shape[0]); a plain "
    "int would be kept as a constant), or make the graphs the rows in "
    "the collate_fn, each padded to the batch's largest "
    "(torch_geometric.utils.to_dense_batch and to_dense_adj give (graphs, nodes, features) and (graphs, nodes, "
    "nodes)), and run dense graph layers. One graph per batch (node classification over one connected graph) has no "
    "rows to split: give it as a batch of one row (each tensor unsqueezed to (1, ...)) and pass num_microbatches=1, "
    "which runs the stages in turn, without overlap. ")


def _time_major(leaves: list[torch.Tensor]) -> str:
    """Advice for a time-major tensor, ``(T, B, ...)`` for ``batch_first=False`` layers, beside tensors whose rows
    (their dim 0) it holds along dim 1."""
    for major in leaves:
        others = {t.shape[0] for t in leaves if t is not major and t.dim() > 0}
        if major.dim() >= 2 and len(others) == 1 and major.shape[0] not in others and major.shape[1] in others:
            return (f"The ({', '.join(map(str, major.shape))}) tensor holds the other tensors' {major.shape[1]} rows "
                    f"along dim 1: time-major, as torch's batch_first=False layers take it ((T, B, ...)). A pipeline "
                    f"splits a batch along dim 0: give the rows first (x.transpose(0, 1) in the collate_fn) and "
                    f"transpose back in the step, or use batch_first=True layers. ")
    return ""


def _offsets(leaves: list[torch.Tensor]) -> str:
    """Advice for a flat concatenation of the rows' sequences beside their start offsets (what ``nn.EmbeddingBag``
    takes, as torch's text classification tutorial collates): a 1-D integer tensor starting at 0 and never falling,
    whose last entry is below the length of another 1-D tensor."""
    flat = [t for t in leaves if t.dim() == 1]
    for offsets in flat:
        if offsets.is_floating_point() or offsets.dtype == torch.bool or len(offsets) < 2 or int(offsets[0]) != 0 \
                or bool((offsets[1:] < offsets[:-1]).any()):
            continue
        if any(len(text) > len(offsets) and int(offsets[-1]) < len(text) for text in flat if text is not offsets):
            return (f"It looks like the rows' sequences concatenated beside their {len(offsets)} start offsets (as "
                    f"nn.EmbeddingBag(text, offsets) takes them), which no split along dim 0 cuts into rows: pad "
                    f"the rows to one length in the collate_fn and give nn.EmbeddingBag the 2-D batch "
                    f"(padding_idx= leaves the padding out of each bag's sum or mean), or give a list of the rows' "
                    f"tensors. ")
    return ""


def _several_loaders(batch: Any) -> str:
    """Advice for a dict of batches that each agree on their rows but not with each other: a dict of DataLoaders."""
    if not isinstance(batch, Mapping) or len(batch) < 2 or any(isinstance(part, torch.Tensor)
                                                                for part in batch.values()):
        return ""  # a loader's batch each: a tuple or dict of them, never a tensor
    rows = []
    for part in batch.values():
        sizes = {t.shape[0] for t in tree_flatten(part)[0] if t.dim() > 0}
        if len(sizes) != 1:
            return ""
        rows.append(sizes.pop())
    if len(set(rows)) == 1:
        return ""
    return (f"The batch's entries {list(batch)} have {rows} rows each, as a dict of DataLoaders (Lightning's "
            f"CombinedLoader) gives when their batch sizes differ or one ends with a smaller batch: give the loaders "
            f"one batch_size and drop_last=True, so that every entry has the same rows. In validation or testing, "
            f"where dropped rows change the metric, return the loaders as a list or dict instead of a CombinedLoader "
            f"of mode 'max_size' or 'min_size': Lightning runs those one after another (mode 'sequential'), each "
            f"batch a loader's own, with its dataloader_idx. ")


def _warn_if_dicts_could_be_rows(lists: _Lists, rows: int) -> None:
    """A list of as many dicts as rows, each of tensors of that many rows, is read as columns (a pair of encodings);
    per-image targets with as many boxes each as the batch has images look the same: say so."""
    for candidate in lists.of_mappings:
        if len(candidate) == rows > 1:
            warnings.warn(f"a list of {rows} dicts in a batch of {rows} rows, each holding tensors of {rows} rows, is "
                          f"split as columns (each dict's tensors along dim 0, as a pair of encodings is), not as one "
                          f"dict per row. If it holds one dict per row (per-image targets that happen to have {rows} "
                          f"boxes each), use a batch size other than the number of items per row")  # (from here: said
            # once where warnings show a message once per place, not from each of the many callers)
            return


def _find_lists(tree: Any, lists: _Lists) -> None:
    if type(tree) in (list, tuple) and tree:
        first = tree[0]
        if isinstance(first, Mapping) and all(isinstance(item, Mapping) and item.keys() == first.keys()
                                              for item in tree):
            if any(tree_flatten(item)[0] for item in tree):
                lists.of_mappings.append(tree)
                return
        elif isinstance(first, torch.Tensor) and first.dim() > 0 and all(
                isinstance(item, torch.Tensor) and item.dtype == first.dtype and item.dim() == first.dim()
                for item in tree):
            lists.of_tensors.append(tree)
            return
        if all(type(item) in _PLAIN for item in tree):
            return  # names, ids
    for child in _children(tree):
        _find_lists(child, lists)


def _children(tree: Any) -> list[Any]:
    if isinstance(tree, (list, tuple)):
        return list(tree)
    if isinstance(tree, Mapping):
        return list(tree.values())
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return list(_dataclass_items(tree).values())
    return []


def _dataclass_items(tree: Any) -> dict[str, Any]:
    """A dataclass batch's fields and the attributes a collate_fn set on it outside them (per-row weights: split with
    the rows like its fields; found by review, they went whole into every micro-batch)."""
    items = dataclass_values(tree)
    items.update({name: value for name, value in getattr(tree, "__dict__", {}).items() if name not in items})
    return items


def _outside(tree: Any, per_row: set[int]) -> list[torch.Tensor]:
    """The tensors of ``tree`` outside the lists ``per_row``."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if id(tree) in per_row:
        return []
    return [t for child in _children(tree) for t in _outside(child, per_row)]


def split_batch(batch: Any, num_microbatches: int, copy: bool = False) -> list[Any]:
    """Split ``batch`` (a tensor or a tuple/list/dict/mapping/dataclass tree of them) into micro-batches along dim 0.

    Uneven batches give uneven micro-batches (10 rows into 4: 3, 3, 2, 2). A batch with fewer rows than
    ``num_microbatches`` gives one micro-batch per row. A list or tuple with one item per row is split with the
    rows: one of non-tensor items (strings, ids, dicts without tensors) as long as the batch has rows (a list of 8
    file names in a batch of 8 rows gives each micro-batch its own names), and one of tensors or of dicts of them
    beside a tensor of the batch's rows, as :func:`_read` tells (per-image detection targets, ragged sequences).
    0-dim tensors and other non-tensor values are given to every micro-batch as they are. A container of columns,
    such as the batch's ``(x, y)`` tuple, stays a container, whatever its length.

    The micro-batches' tensors are views of the batch's, unless ``copy`` (see :func:`owned`).

    Raises ``ValueError`` for a batch of 0 rows: every rank is given the same batch, so each raises it before any
    rank waits for another.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
    rows, per_row = _read(batch)
    if rows == 0:
        raise ValueError("the batch has 0 rows: a pipeline step needs at least one; skip empty batches before the "
                         "step (e.g. drop_last=True in the DataLoader, or a filter in the dataset)")
    count = max(1, min(num_microbatches, rows))
    base, extra = divmod(rows, count)  # the first `extra` micro-batches get one row more, as torch.tensor_split does
    starts = [i * base + min(i, extra) for i in range(count + 1)]
    known: dict[int, Any] = {}  # (each dataclass of the batch made again once, not once per micro-batch)
    return [_take(batch, rows, per_row, slice(starts[i], starts[i + 1]), copy, known) for i in range(count)]


def owned(batch: Any) -> Any:
    """``batch`` (a batch or a micro-batch) with tensors of its own, for step code to run on. A micro-batch's tensors
    are views of the batch's, which share one version counter: a change in place to one micro-batch (step code's
    ``x.div_(255)``, ``labels[labels == pad] = -100``) would fail the backward of another whose tensor a layer
    saved, and would reach the batch, which the micro-batch's other runs (first and last stage on one rank) and the
    runs on the whole batch read again."""
    rows, per_row = _read(batch, warn=False)  # read before (a micro-batch with its batch): nothing more to say
    return _take(batch, rows, per_row, slice(None), copy=True)


def _take(tree: Any, rows: int, per_row: set[int], part: slice, copy: bool,
          known: dict[int, Any] | None = None) -> Any:
    """The rows ``part`` of ``tree`` (``per_row``: the ids of its lists holding one item per row), its tensors copied
    if ``copy``."""
    if isinstance(tree, torch.Tensor):
        piece = tree[part] if tree.dim() > 0 else tree
        return piece.clone() if copy else piece
    if id(tree) in per_row or _is_per_row(tree, rows):
        return tree[part]
    if isinstance(tree, tuple):
        children = [_take(child, rows, per_row, part, copy, known) for child in tree]
        return type(tree)(*children) if hasattr(tree, "_fields") else tuple(children)
    if isinstance(tree, list):
        return [_take(child, rows, per_row, part, copy, known) for child in tree]
    if isinstance(tree, dict):
        return {key: _take(child, rows, per_row, part, copy, known) for key, child in tree.items()}
    if isinstance(tree, Mapping):  # Hugging Face's BatchEncoding, a UserDict: split as a dict, kept of its type
        return rebuild_mapping(type(tree),
                               {key: _take(child, rows, per_row, part, copy, known) for key, child in tree.items()})
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # each field split, the rest kept
        return dataclass_part(tree, {name: _take(value, rows, per_row, part, copy, known)
                                     for name, value in _dataclass_items(tree).items()}, known)
    return tree


def _is_per_row(tree: Any, rows: int) -> bool:
    """A plain list or tuple of ``rows`` items none of which holds a tensor: one item per row."""
    return (type(tree) in (list, tuple) and len(tree) == rows
            and not any(tree_flatten(item)[0] for item in tree))


def per_row_lists(microbatch: Any, rows: int, path: str = "batch") -> list[str]:
    """Where ``microbatch`` (of ``rows`` rows) holds plain lists or tuples split one item per row (file names, or a
    per-batch list that happened to have as many items as the batch has rows), as ``batch['key']`` paths."""
    if _is_per_row(microbatch, rows):
        return [path]
    if isinstance(microbatch, dict):
        return [found for key, value in microbatch.items() for found in per_row_lists(value, rows, f"{path}[{key!r}]")]
    if type(microbatch) in (list, tuple):
        return [found for index, value in enumerate(microbatch) for found in per_row_lists(value, rows,
                                                                                          f"{path}[{index}]")]
    return []


def microbatch_weights(microbatches: list[Any]) -> list[float]:
    """Weight of each micro-batch's mean loss so that their weighted sum is the mean loss over the batch."""
    rows = [batch_rows(mb, microbatch=True) for mb in microbatches]
    total = sum(rows)
    return [r / total for r in rows]
