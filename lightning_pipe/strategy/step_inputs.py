"""Whether a step's code before the model lets the rows of a batch meet, told from the first batch.

The first stage runs the step up to the model on each micro-batch alone. Code there that mixes the batch's rows (a
mixup or cutmix pairing each row with ``x.flip(0)``, a normalization by the batch's statistics), or that draws from
a ``torch.Generator`` it makes and seeds at each step (each micro-batch then draws the first numbers again: a
diffusion model's noise repeated), gives the model other inputs than one device would, and nothing fails. On the
first batch of each step the first stage runs that code once more on the whole batch and compares the model's
inputs with the micro-batches' put together (:func:`lightning_pipe.engine.rows.parts_differ`).
Code drawing from the global generators, or from generators the module holds (a mixup drawing its ratio from NumPy),
draws other numbers for the whole batch than for its micro-batches, so there the check asks another question: run
twice on the whole batch from the same generator states, once as it is and once with the rows after the first
micro-batch's changed (:func:`shifted_rows`), do the first micro-batch's rows of the model's inputs change? Rows that
do not meet keep them. The check runs on copies of the batch and puts the generators back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_pipe.engine.rows import parts_differ
from lightning_pipe.engine.tree import tree_flatten

__all__ = ["inputs_warning", "mixing_warning", "shifted_rows"]


def inputs_warning(step: str, parts: Sequence[list[Any]], whole: list[Any], where: str = "the first batch"
                   ) -> str | None:
    """What to tell a user whose ``step`` gives the model other inputs for the whole batch (``whole``: their tensors)
    than for its micro-batches one by one (``parts``), found on ``where``; None if they agree or cannot be
    compared."""
    difference = parts_differ(list(parts), whole)
    if difference is None or parts_differ(rebased(parts, whole), whole) is None \
            or as_views(parts, whole):
        return None
    return _warning(step, f"other inputs for the whole batch than for its {len(parts)} micro-batches one by one "
                          f"(relative difference {difference:.2g}, on {where})",
                    "or draws random numbers from a torch.Generator of its own seeded at each step (each micro-batch "
                    "then draws the same first numbers)")


def rebased(parts: Sequence[list[Any]], whole: list[Any]) -> list[list[Any]]:
    """``parts`` with each integer tensor that equals its rows of ``whole`` but for one number added (an index
    relative to its micro-batch: a batch of graphs' node-to-graph vector, numbered from 0 in each micro-batch as
    in the whole batch from the graphs before) given that number added, so that it reads as the whole's."""
    parts = [list(part) for part in parts]
    for index, together in enumerate(whole):
        if not isinstance(together, torch.Tensor) or together.is_floating_point() or together.is_complex() \
                or together.dtype == torch.bool or together.dim() == 0:
            continue
        pieces = [part[index] if index < len(part) else None for part in parts]
        if not all(isinstance(piece, torch.Tensor) and piece.dtype == together.dtype and piece.dim() > 0
                   and piece.shape[1:] == together.shape[1:] for piece in pieces) \
                or sum(piece.shape[0] for piece in pieces) != together.shape[0]:
            continue
        if any(piece.numel() < 2 for piece in pieces):
            continue  # one number is any other plus something: no evidence of an index
        start, shifted = 0, []
        for piece in pieces:
            rows = together[start:start + piece.shape[0]]
            start += piece.shape[0]
            offset = rows.flatten()[0] - piece.flatten()[0]
            shifted.append(piece + offset if torch.equal(piece + offset, rows) else piece)
        for part, piece in zip(parts, shifted):
            part[index] = piece
    return parts


def as_views(parts: Sequence[list[Any]], whole: list[Any]) -> bool:
    """Whether ``parts`` agree with ``whole`` where some of their tensors are read as views of the rows stacked along
    them (``torch.cat([x1, x2])`` of two views, DANN's source and target batches: each micro-batch's ``k`` views of
    its rows, the whole batch's ``k`` views of all rows), the others as they are: a model given such views sees one
    device's rows, in another order."""
    viewed = False
    for index, value in enumerate(whole):
        pieces = [part[index] if index < len(part) else None for part in parts]
        if parts_differ([[piece] for piece in pieces], [value]) is None:
            continue
        if not (isinstance(value, torch.Tensor) and value.dim() > 0 and all(
                isinstance(piece, torch.Tensor) and piece.dim() > 0 for piece in pieces)):
            return False
        for views in (2, 3, 4):
            if all(piece.shape[0] % views == 0 for piece in pieces) and parts_differ([[torch.cat(
                    [piece.unflatten(0, (views, -1))[view] for view in range(views) for piece in pieces])]],
                    [value]) is None:
                viewed = True
                break
        else:
            return False
    return viewed


def mixing_warning(step: str, rows: int, first: int, kept: list[Any], shifted: list[Any],
                   where: str = "the first batch") -> str | None:
    """What to tell a user whose ``step`` draws random numbers and gives the model other inputs for the first
    ``first`` rows of a ``rows``-row batch (``kept``: their tensors) when only the other rows changed (``shifted``:
    :func:`shifted_rows`' batch's), found on ``where``; None if they agree or cannot be compared."""
    if len(kept) != len(shifted):
        return None
    pairs = [(a[:first], b[:first]) for a, b in zip(kept, shifted)
             if a.dim() > 0 and a.shape[0] == rows and a.shape == b.shape and a.dtype == b.dtype]
    difference = parts_differ([[a for a, _ in pairs]], [b for _, b in pairs]) if pairs else None
    if difference is None:
        return None
    return _warning(step, f"other inputs for the rows of the first micro-batch when only the other rows of the batch "
                          f"change (relative difference {difference:.2g}, on {where}, drawing the same random "
                          f"numbers)", "")


def _warning(step: str, what: str, or_draws: str) -> str:
    draws = f", {or_draws}" if or_draws else ""
    return (f"{step}'s code before the model gives it {what}: it lets the rows of the batch meet before the model (a "
            f"mixup or cutmix with x.flip(0), a normalization by the batch's statistics){draws}. "
            f"A pipeline runs this code on each micro-batch alone, so the model sees other inputs than on one device: "
            f"mix the rows in the dataloader's collate_fn (timm's Mixup can run there), and draw from torch's global "
            f"generator, which the pipeline forks per micro-batch")


def shifted_rows(batch: Any, rows: int, first: int) -> Any:
    """``batch`` (a copy of its own) with the rows after the first ``first`` of each ``rows``-row tensor changed in
    place: floating and complex values plus one, booleans negated, integers to the next value that the tensor holds
    (the largest to the smallest: an index stays an index, a label ignored stays one of the labels)."""
    for leaf in tree_flatten(batch)[0]:
        if leaf.dim() == 0 or leaf.shape[0] != rows or leaf.numel() == 0:
            continue
        rest = leaf[first:]
        if leaf.is_floating_point() or leaf.is_complex():
            rest.add_(1)
        elif leaf.dtype == torch.bool:
            rest.logical_not_()
        else:
            held = torch.unique(leaf)  # sorted
            rest.copy_(held[(torch.searchsorted(held, rest) + 1) % len(held)])
    return batch
