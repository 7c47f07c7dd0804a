"""Copies of the model's output for steps that change it in place (``out.div_(T)``): the last stage keeps the
micro-batches' outputs for the step's run on the whole batch, which would otherwise read them changed already. A
step's first run is given a copy, and its tensors' version counters tell whether it changes them; a step that does
gets copies from then on."""

from __future__ import annotations

from typing import Any

import torch

from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors

__all__ = ["OutputCopies"]


def _versions(tree: Any) -> list[int]:
    """The version counters of ``tree``'s tensors (each change in place moves one)."""
    return [tensor._version for tensor in tree_flatten(tree)[0] if isinstance(tensor, torch.Tensor)]


class OutputCopies:
    """Which steps change the model's output in place, learned at their runs (:meth:`given`, then :meth:`changed`)."""

    def __init__(self) -> None:
        self._changing: set[str] = set()  # steps whose code changes the output in place
        self._looked: set[str] = set()  # steps whose first run (given a copy) told whether they do

    def given(self, step: str, output: Any) -> tuple[Any, tuple[Any, list[int]] | None]:
        """What a run of ``step`` is given of the model's ``output``: a copy where its code changes the output in
        place, and at its first run, which tells; else the output. With it, what to look at after the run (the
        tensors given, and their versions), where not known yet."""
        copied = step in self._changing or step not in self._looked
        given = tree_map_tensors(torch.Tensor.clone, output) if copied else output
        return given, None if step in self._changing else (given, _versions(given))

    def changed(self, step: str, output: Any, watched: tuple[Any, list[int]] | None) -> bool:
        """Whether a run of ``step`` changed the model's ``output`` itself in place (``watched``: what it was given,
        and their versions before); from a change on, its runs get copies."""
        self._looked.add(step)
        if watched is None or watched[1] == _versions(watched[0]):
            return False
        self._changing.add(step)
        return watched[0] is output
