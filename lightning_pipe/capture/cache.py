"""The captures of one model, and finding the one that fits a call: by mode (the model's, and any of its modules set
otherwise), autocast state and input pattern."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import CaptureError
from .losses import CountedMean, MeanLoss
from .patterns import Pattern, all_match, autocast_state, describe, overlap, pattern_of
from .points import Cut, cut_label
from .programs import Program

__all__ = ["Capture", "CaptureCache", "modes_of"]


@dataclass
class Capture:
    """The model's forward captured once (one mode, autocast state and input pattern) and cut into programs."""

    training: bool
    autocast: tuple
    dynamic: bool
    """Whether the input sizes stayed symbolic (one capture serves every size) or are the example's."""
    in_patterns: tuple[Pattern, ...]
    in_spec: pytree.TreeSpec
    """How ``(args, kwargs)`` flatten to segment 0's inputs."""
    out_spec: pytree.TreeSpec
    """How the last segment's values rebuild the model's output (a ModelOutput, a tuple, a tensor)."""
    programs: list[Program]
    cuts: list[Cut]
    device: torch.device
    """The device baked into the programs: the splitter's, else the inputs' (``meta`` only where both are)."""
    export_seconds: float
    cut_seconds: float
    rows_meet: str | None = None
    """Where the forward makes a value with the batch's rows along two dimensions (:mod:`.coupling`), if it does."""
    example_rows: int | None = None
    """The model's rows in the example it was captured from (:func:`.graph_rows.example_rows`)."""
    edge_list: bool = False
    """Whether the example's inputs hold a graph's edge list (an integer ``(2, edges)`` tensor, PyTorch Geometric's
    ``edge_index``): the model's rows are then nodes, not views of the batch's rows put together."""
    output_kinds: tuple[str | int | None, ...] | None = None
    """How each output (in ``out_spec``'s order) adds up over micro-batches: a 0-dim floating one's kind, a
    tensor's dim of the rows (:func:`.scalars.output_kinds`)."""
    output_dims: tuple[int | None, ...] | None = None
    """The number of dims of each output (None for a number), in ``out_spec``'s order."""
    output_markers: tuple[Any, ...] | None = None
    """Stand-ins that rebuild an output of ``out_spec`` whose tensors name their index (:func:`.output_markers`)."""
    counted_means: tuple[CountedMean, ...] = ()
    """Means the forward takes over a count of its inputs' elements (:func:`.losses.counted_means`)."""
    mean_losses: tuple[MeanLoss, ...] = ()
    """Its cross entropies and NLLs that average over their targets (:func:`.losses.mean_losses`)."""
    modes: frozenset[str] = frozenset()
    """The model's modules that were in the other mode than ``training`` when it was captured (a frozen backbone's
    batch norms in eval while the model trains: :func:`modes_of`), and the flags its forward read that held the other
    value than at their first capture (``place=value``): the graphs keep them
    (:meth:`~.splitter.Splitter.follow_modes`)."""
    provisional: bool = False
    """Made from the model's inputs before any of the user's hooks ran (a pipeline's set-up): a capture for the
    inputs of a step that would share a segment's inputs with it replaces it, rather than being refused as
    ambiguous (an RNN's state, None at set-up, a tensor once a hook set it), until a step of its mode ran."""

    @property
    def serves_every_size(self) -> bool:
        """Whether every size of every tensor input stayed symbolic. A symbolic capture may still fix some (an
        image's channels; a sequence length that a Python loop runs over): then it serves those sizes only."""
        return self.dynamic and all(p[0] != "t" or all(size is None for size in p[2]) for p in self.in_patterns)

    @property
    def digest(self) -> str:
        """A hash of the cut (split points, what is live at each cut, each segment's state and ops) that ranks
        compare to prove they cut the same way; devices and timings are left out."""
        parts: list[Any] = [self.training, sorted(self.modes), [cut_label(c) for c in self.cuts], str(self.out_spec)]
        for program in self.programs:
            parts.append((describe(program.live_in), program.state, program.ops))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def modes_of(model: torch.nn.Module, training: bool) -> frozenset[str]:
    """The names of ``model``'s modules in the other mode than ``training`` (none where the model itself is in the
    other mode: a capture in ``training`` mode then sets every module to it)."""
    if model.training != training or all(module.training == training for module in model.modules()):
        return frozenset()
    return frozenset(name for name, module in model.named_modules() if module.training != training)


class CaptureCache:
    """Every capture of one model; each segment finds its program by its mode, the modes of the model's modules now
    (:attr:`modes`, which the splitter follows), the autocast state and the values it is given (the last one found is
    tried first: a training loop asks for the same one again and again)."""

    def __init__(self) -> None:
        self.captures: list[Capture] = []
        self.modes: frozenset[str] = frozenset()  # the model's modules in the other mode than it, now
        self._last: dict[int, tuple[bool, frozenset[str], tuple, Capture]] = {}

    def add(self, capture: Capture) -> None:
        """Keep ``capture``; refuses one that would make some segment's lookup ambiguous, but where that is a
        provisional capture (:attr:`Capture.provisional`), drops that one instead."""
        for other in list(self.captures):
            if (other.training, other.modes, other.autocast) != (capture.training, capture.modes, capture.autocast):
                continue
            for index, (mine, theirs) in enumerate(zip(capture.programs, other.programs)):
                last = index == len(capture.programs) - 1
                same = mine.fingerprint() == theirs.fingerprint() and (not last or capture.out_spec == other.out_spec)
                if overlap(mine.live_in, theirs.live_in) and not same and other.provisional:
                    self.captures.remove(other)
                    self._last = {key: entry for key, entry in self._last.items() if entry[-1] is not other}
                    break
                if overlap(mine.live_in, theirs.live_in) and not same:
                    raise CaptureError(
                        f"two captures of the model give segment {index} the same kind of values "
                        f"{describe(mine.live_in)} but run different ops on them, so a segment could not tell which "
                        f"to run; {_changed_values(capture, other)}call the model with the same arguments every "
                        f"time: the same keywords (a tensor passed to some calls and left out of others, such as an "
                        f"attention_mask, counts), the same non-tensor values (flags, sizes)")
        self.captures.append(capture)

    def for_inputs(self, training: bool, flat: Sequence[Any]) -> Capture | None:
        """The capture whose model inputs fit ``flat``, in this mode and autocast state."""
        return self._find(0, training, flat, lambda c: c.in_patterns)

    def for_segment(self, index: int, training: bool, live: Sequence[Any]) -> Capture:
        """The capture whose segment ``index`` takes ``live``; raises with what to do when none does."""
        found = self._find(index, training, live, lambda c: c.programs[index].live_in)
        if found is None:
            mode = ("train" if training else "eval") + (f" ({', '.join(sorted(self.modes))} in the other)"
                                                        if self.modes else "")
            raise CaptureError(
                f"segment {index} got values no capture of this model expects in {mode} mode (autocast "
                f"{autocast_state() or 'off'}; known: "
                f"{[describe(c.programs[index].live_in) for c in self.captures if c.training == training]}): the "
                f"model was called otherwise than in the calls it was captured from. Under a Trainer, call it the "
                f"same way at every batch of a step (the same keywords, labels=None given where a batch has none, "
                f"the same non-tensor values); each evaluation dataloader may call it its own way. Using the "
                f"splitter directly: call splitter.capture(args, kwargs, training={training}) with this "
                f"micro-batch's model inputs on every rank before running it{_other_sizes(self.captures, index, live)}")
        return found

    def _find(self, index: int, training: bool, values: Sequence[Any], patterns: Any) -> Capture | None:
        autocast, modes = autocast_state(), self.modes
        last = self._last.get(index)
        if last is not None and last[:3] == (training, modes, autocast) and all_match(patterns(last[3]), values):
            return last[3]
        for capture in self.captures:
            if (capture.training == training and capture.modes == modes and capture.autocast == autocast
                    and all_match(patterns(capture), values)):
                self._last[index] = (training, modes, autocast, capture)
                return capture
        return None


def _other_sizes(captures: Sequence[Capture], index: int, live: Sequence[Any]) -> str:
    """Where ``live`` differs from what some capture's segment ``index`` takes only in sizes: why that may be and
    what to do (found by review: a speech step trimming its padding, ``x[:, :lengths.max()]``)."""
    got = [pattern_of(value) for value in live]
    for capture in captures:
        known = capture.programs[index].live_in
        if len(known) == len(got) and all(
                mine[0] == theirs[0] == "t" and mine[1] == theirs[1] and len(mine[2]) == len(theirs[2])
                or mine == theirs or theirs[0] == "int" and isinstance(mine[-1], int)
                for mine, theirs in zip(got, known)):
            return (f". These differ from a capture's only in sizes ({describe(got)}): one the capture holds fixed (a "
                    f"recurrent layer's sequence length, a reshape to a number) changed between the micro-batches "
                    f"of a step. Where the step's code sizes the model's input from each micro-batch's values "
                    f"(x[:, :lengths.max()], trimming padding to the longest row), every micro-batch gets its own "
                    f"size, where one device's whole batch has one: trim or pad in the DataLoader's collate_fn "
                    f"instead (to the batch's longest row), or pad every batch to one length")
    return ""


def _changed_values(capture: Capture, other: Capture) -> str:
    """The model's non-tensor arguments that two captures were given different values of, named (``scale``), with
    the fix; "" for none."""
    changed = [(index, mine[1], theirs[1]) for index, (mine, theirs) in enumerate(zip(capture.in_patterns,
                                                                                      other.in_patterns))
               if mine[0] == "v" and theirs[0] == "v" and mine[1] != theirs[1]]
    if not changed:
        return ""
    try:
        paths = [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(
            pytree.tree_unflatten(list(range(len(capture.in_patterns))), capture.in_spec))[0]]
    except Exception:  # noqa: BLE001 - unnamed: by position
        paths = [f"#{index}" for index in range(len(capture.in_patterns))]
    named = ", ".join(f"{_argument(paths[index])} ({theirs!r}, then {mine!r})" for index, mine, theirs in changed)
    strings = any(isinstance(value, str) for _, mine, theirs in changed for value in (mine, theirs))
    counts = all(type(value) is int for _, mine, theirs in changed for value in (mine, theirs))
    return (f"the model was given other values of {named}, which a captured graph keeps as constants: pass a value "
            f"that changes from step to step as a tensor (torch.tensor(value)), or keep it fixed" + (
                " (a count that sizes something, the number of graphs given to PyTorch Geometric's pooling as "
                "size=..., goes as a tensor of that length instead, torch.arange(count), read in the forward as "
                "its .shape[0]: the graph keeps it symbolic; a micro-batch may then hold another count)"
                if counts else "") + (
                " (a name that picks a module, self.heads[task], cannot be a tensor: run every task's head in "
                "forward and pick each row's output in the step, with the task as a tensor of ids in the batch)"
                if strings else "") + "; ")


def _argument(path: str) -> str:
    """A model argument's name from its pytree path in ``(args, kwargs)``: ``[1]['scale']`` -> ``scale``."""
    if path.startswith("[1]['") and path.endswith("']") and path.count("[") == 2:
        return path[5:-2]
    if path.startswith("[0][") and path.count("[") == 2:
        return f"positional argument {path[4:-1]}"
    return path
