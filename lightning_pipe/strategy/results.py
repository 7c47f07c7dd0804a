"""What the last stage sends every rank after a step, encoded as tensors and JSON (no pickle), in one exchange.

After each step every rank must return, log and checkpoint what the last stage computed: the loss, the combined
``self.log`` values, the torchmetrics' batch state and the step's outputs. This used to be a pickled broadcast
(~2.3 ms per step on a small model, and ``pickle.loads`` of bytes from another process). Now a result is a tree
encoded as a JSON structure (names, options, numbers, strings, and each tensor's dtype and shape) and the tensors' raw
bytes. The structure is sent only when it changes (the logged names and shapes of a run seldom do); a small result
travels inside the one fixed-size message every rank already exchanges, and only a large one (a big prediction) takes
a second, exactly sized broadcast.

That one message is an ``all_reduce(MAX)`` of 64 int64 words over the pipeline's ranks: the last stage writes its
result words and every other rank writes the smallest int64 there, so the maximum is the result, bit for bit. The
first two words carry every rank's batch fingerprint ``f`` and ``-f``: their maxima are the largest and (negated) the
smallest fingerprint, equal exactly when every rank read the same batch (:mod:`.fingerprint`); the fifth is a flag any
rank may raise for all (the strategy's: "this rank received SIGTERM", which Lightning would otherwise broadcast from
rank 0 in a collective of its own before every step). A value a step returns
that this encoding cannot carry (an arbitrary object) is an error that names the value and how to return it instead.

On gloo the same 64 words travel as messages instead, on a tag of their own beside the pipeline's (tag 0): when a
step starts, every other rank sends the last stage its fingerprint and flag and posts the receive of the answer; the
last stage folds them into its words as the maximum would and sends them back. Nobody waits for a rendezvous of all
ranks at the end of a step (the others' halves arrived long before the last stage finished, the answer arrives while
the others still compute), and gloo's all_reduce of 64 words costs 0.3-1.5 ms on 2 ranks where a message costs 0.1.
Between ranks of one machine these messages take Unix sockets of their own (:mod:`lightning_pipe.engine.local_link`):
tens of microseconds each.
NCCL ignores tags and orders a peer's operations (docs/transport.md), so under it, and in the strict mode that
emulates it, the all_reduce stays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine import local_link
from lightning_pipe.engine.deadline import collective, wait_messages
from lightning_pipe.engine.notices import default_store
from lightning_pipe.engine.runtime import next_serial
from lightning_pipe.engine.tree import rebuild_mapping
from lightning_pipe.engine.wire import (
    dataclass_values,
    flat_bytes,
    imported_class,
    is_namedtuple_class,
    rebuilt_dataclass,
    refuse_local_class,
)
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT, arm_exit_guard
from lightning_pipe.strategy.logs import REDUCTION_NAMES, LoggedValue

__all__ = ["StepResult", "ResultChannel", "encode", "sendable", "decode", "tensor_specs", "encode_result",
           "decode_result", "gather_results"]

_WORDS = 64
_HEAD = 5  # fingerprint, -fingerprint, payload bytes, structure bytes (-1: unchanged), any rank's flag
_INLINE = (_WORDS - _HEAD) * 8
_LOWEST = torch.iinfo(torch.int64).min
_UNCHANGED = -1
_FAILED = -2  # in the payload-length word of an answer: the source failed in this step


@dataclass
class StepResult:
    """What the last stage sends every rank after a step."""

    loss: torch.Tensor | None = None
    output: Any = None
    logs: list[LoggedValue] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    rows: int = 0
    grad_scale: float = 1.0  # the factor of this batch's gradients on every rank (a summed loss found by "auto")
    effects: list[tuple[Any, ...]] = field(default_factory=list)  # the step's changes to the module (.step_effects)
    logger_calls: list[tuple[int, list[str], list[Any], dict[str, Any]]] = field(default_factory=list)  # for rank 0
    error_kind: str = ""  # the user's exception type of ``error``, as "module:qualname" (:func:`.notices.type_name`)
    whole: bool = False  # its logs and output were checked against (or taken from) a run of the step on the whole batch
    validate: bool | None = None  # a time-based val_check_interval: whether validation is due (the last stage's clock)


# -- a tree of values as (JSON structure, tensors) -------------------------------------------------
_STEP_ADVICE = ("return it as one of those (an object as a tensor, or a dataclass holding those), or keep it on "
                "the module instead of returning it")


def encode(value: Any, tensors: list[torch.Tensor], where: str = "the step's output",
           advice: str = _STEP_ADVICE, path: str = "") -> Any:
    """``value`` as a JSON-able structure; its tensors (on the CPU) are appended to ``tensors``.

    Carried: None, bools, numbers, strings, tensors (dense, and sparse COO), NumPy arrays and scalars, torch's dtypes
    and devices (an optimizer's group may hold one), and lists, tuples, dicts and Counters (an LR scheduler's
    milestones) of them, torch's named tuples of results (``torch.return_types.topk``), and dataclasses (a model's
    output, a Hugging Face ``ModelOutput``) and namedtuples of classes every rank has imported. ``path``: where
    ``value`` is in what ``where`` names, for the error.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and type(value) in (int, float):
        return value
    if isinstance(value, torch.Tensor) and value.layout == torch.sparse_coo:  # (SGD's momentum for a sparse gradient)
        value = value.detach().cpu()
        tensors += [value._indices().contiguous(), value._values().contiguous()]
        return {"S": [str(value.dtype).removeprefix("torch."), list(value.shape), value.is_coalesced(),
                      list(tensors[-2].shape), list(tensors[-1].shape)]}
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        at = f" (at {path})" if path else ""
        raise TypeError(f"{where} holds a tensor of layout {value.layout}{at}, which PipelineStrategy cannot send "
                        f"between ranks (it sends dense tensors and sparse COO ones): turn it into one of those "
                        f"(.to_dense(), .to_sparse()) before it is sent")
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach().cpu().contiguous())
        return {"T": [str(value.dtype).removeprefix("torch."), list(value.shape)]}
    if isinstance(value, torch.dtype):
        return {"D": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"V": str(value)}
    if type(value) is Counter:  # MultiStepLR's milestones: a Counter again, as a one-device resume loads it
        return {"C": [[encode(key, tensors, where, advice, path), encode(item, tensors, where, advice,
                                                                         f"{path}[{key!r}]")]
                      for key, item in value.items()]}
    if type(value) in (dict, OrderedDict):  # an OrderedDict (a state_dict) comes back as a dict, in its order
        if all(isinstance(key, str) for key in value):
            return {"s": {key: encode(item, tensors, where, advice, f"{path}[{key!r}]") for key, item in value.items()}}
        return {"d": [[encode(key, tensors, where, advice, path), encode(item, tensors, where, advice,
                                                                          f"{path}[{key!r}]")]
                      for key, item in value.items()]}
    if type(value) is list:
        return {"l": [encode(item, tensors, where, advice, f"{path}[{index}]") for index, item in enumerate(value)]}
    if type(value) is tuple:
        return {"t": [encode(item, tensors, where, advice, f"{path}[{index}]") for index, item in enumerate(value)]}
    if _return_type(value) is not None:  # torch's named tuples of results (topk, max, sort)
        return {"r": [type(value).__name__, [encode(item, tensors, where, advice, f"{path}[{index}]")
                                             for index, item in enumerate(value)]]}
    kind, sent_at = type(value), f"{where}{f' (at {path})' if path else ''}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a model's output (a ModelOutput too)
        refuse_local_class(kind, sent_at, TypeError)
        return {"c": [kind.__module__, kind.__qualname__,
                      {name: encode(item, tensors, where, advice, f"{path}.{name}")
                       for name, item in dataclass_values(value).items()}]}
    if isinstance(value, Mapping):  # a mapping of one's own class (an OrderedDict subclass, a BatchEncoding)
        refuse_local_class(kind, sent_at, TypeError)
        return {"m": [kind.__module__, kind.__qualname__, encode(dict(value), tensors, where, advice, path)]}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple of one's own
        refuse_local_class(kind, sent_at, TypeError)
        return {"n": [kind.__module__, kind.__qualname__, [encode(item, tensors, where, advice, f"{path}[{index}]")
                                                           for index, item in enumerate(value)]]}
    numpy = _numpy_kind(value)
    if numpy == "array":
        tensors.append(torch.from_numpy(value).contiguous())
        return {"N": [str(tensors[-1].dtype).removeprefix("torch."), list(value.shape)]}
    if numpy == "scalar":
        return encode(value.item(), tensors, where, advice, path)
    at = f" (at {path})" if path else ""
    raise TypeError(f"{where} holds a {type(value).__qualname__}{at}, which PipelineStrategy cannot send between "
                    f"ranks (it sends tensors, numbers, strings, None, NumPy arrays, torch's dtypes and devices, and "
                    f"lists, tuples, dicts, dataclasses and namedtuples of them, never pickled objects); {advice}")


def sendable(value: Any) -> bool:
    """Whether :func:`encode` carries ``value`` (a tensor: a dense or sparse COO one, of torch's own type)."""
    if isinstance(value, torch.Tensor):
        return type(value) in (torch.Tensor, torch.nn.Parameter) and value.layout in (torch.strided, torch.sparse_coo)
    if value is None or isinstance(value, (bool, str, torch.dtype, torch.device)) or type(value) in (int, float):
        return True
    local = "<locals>" in type(value).__qualname__  # (a class defined in a function: refused by encode)
    if isinstance(value, Mapping) and not local:
        return all(sendable(key) and sendable(item) for key, item in value.items())
    if type(value) in (list, tuple) or _return_type(value) is not None or \
            isinstance(value, tuple) and hasattr(value, "_fields") and not local:
        return all(sendable(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not local:
        return all(sendable(item) for item in dataclass_values(value).values())
    return _numpy_kind(value) is not None


def decode(structure: Any, tensors: list[torch.Tensor]) -> Any:
    """The value :func:`encode` turned into ``structure``; ``tensors`` are consumed from the front, in order."""
    if not isinstance(structure, dict):
        return structure
    ((kind, body),) = structure.items()
    if kind in ("T", "N"):
        tensor = tensors.pop(0)
        return tensor.numpy() if kind == "N" else tensor
    if kind == "S":
        indices, values = tensors.pop(0), tensors.pop(0)
        return torch.sparse_coo_tensor(indices, values, body[1], is_coalesced=bool(body[2]))
    if kind == "D":
        dtype = getattr(torch, body, None) if isinstance(body, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {body!r} in a step result")
        return dtype
    if kind == "V":
        return torch.device(body)
    if kind == "s":
        return {key: decode(item, tensors) for key, item in body.items()}
    if kind == "d":
        return {_hashable(decode(key, tensors)): decode(item, tensors) for key, item in body}
    if kind == "C":
        return Counter({_hashable(decode(key, tensors)): decode(item, tensors) for key, item in body})
    if kind == "l":
        return [decode(item, tensors) for item in body]
    if kind == "t":
        return tuple(decode(item, tensors) for item in body)
    if kind == "c":  # from a module this process has imported, its fields as they were (wire's rules)
        cls = imported_class(body[0], body[1], "dataclass", dataclasses.is_dataclass)
        return rebuilt_dataclass(cls, {name: decode(item, tensors) for name, item in body[2].items()})
    if kind == "m":
        cls = imported_class(body[0], body[1], "mapping class", lambda found: issubclass(found, Mapping))
        return rebuild_mapping(cls, decode(body[2], tensors))
    if kind == "n":
        cls = imported_class(body[0], body[1], "namedtuple", is_namedtuple_class)
        return cls(*(decode(item, tensors) for item in body[2]))
    if kind == "r":
        name, items = body
        made = getattr(torch.return_types, name, None) if isinstance(name, str) else None
        if not (isinstance(made, type) and issubclass(made, tuple) and made.__module__ == "torch.return_types"):
            raise ValueError(f"unknown result type {name!r} in a step result")  # never made: anything but those
        return made(tuple(decode(item, tensors) for item in items))
    raise ValueError(f"unknown kind {kind!r} in a step result")


def _return_type(value: Any) -> type | None:
    """The type of ``value`` where it is one of torch's named tuples of results (``torch.return_types.topk``)."""
    kind = type(value)
    return kind if isinstance(value, tuple) and kind.__module__ == "torch.return_types" else None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _numpy_kind(value: Any) -> str | None:
    module = type(value).__module__
    if not module.startswith("numpy"):
        return None
    import numpy

    if isinstance(value, numpy.ndarray) and value.dtype.kind in "biufc":
        return "array"
    if isinstance(value, numpy.generic) and value.dtype.kind in "biufc":
        return "scalar"
    return None


def tensor_specs(structure: Any, specs: list[tuple[str, list[int]]] | None = None) -> list[tuple[str, list[int]]]:
    """The (dtype, shape) of every tensor in ``structure``, in encoding order."""
    specs = [] if specs is None else specs
    if isinstance(structure, dict):
        ((kind, body),) = structure.items()
        if kind in ("T", "N"):
            specs.append((body[0], body[1]))
        elif kind == "S":  # a sparse tensor's indices and values
            specs += [("int64", body[3]), (body[0], body[4])]
        elif kind == "c":
            for item in body[2].values():
                tensor_specs(item, specs)
        elif kind == "m":
            tensor_specs(body[2], specs)
        elif kind == "n":
            for item in body[2]:
                tensor_specs(item, specs)
        elif kind == "s":
            for item in body.values():
                tensor_specs(item, specs)
        elif kind in ("d", "C"):
            for key, item in body:
                tensor_specs(key, specs)
                tensor_specs(item, specs)
        elif kind == "r":
            for item in body[1]:
                tensor_specs(item, specs)
        elif kind in ("D", "V"):  # a dtype or a device: no tensor
            pass
        else:
            for item in body:
                tensor_specs(item, specs)
    return specs


def encode_result(result: StepResult, step: str) -> tuple[str, list[torch.Tensor]]:
    """A :class:`StepResult` as a JSON text and its tensors; raises TypeError for a value that cannot be sent."""
    tensors: list[torch.Tensor] = []  # in the order decode() meets them: the fields' order below
    loss = encode(result.loss, tensors)
    output = encode(result.output, tensors, f"{step}'s output")
    logs = []
    for entry in result.logs:
        options = {key: _reduce_name(value) if key == "reduce_fx" else value for key, value in entry.options.items()}
        logs.append({"l": [entry.name, encode(entry.value, tensors, f"self.log({entry.name!r})"), entry.metric,
                           encode(options, tensors, f"the options of self.log({entry.name!r})"), entry.batch_size,
                           entry.weight, entry.inferred, entry.by_count]})
    metrics = encode(result.metrics, tensors, "a torchmetrics state")
    effects = [encode(list(patch), tensors, f"self.{patch[1]}") for patch in result.effects]
    calls = [encode(list(call), tensors, "a logger call") for call in result.logger_calls]
    structure = {"s": {"loss": loss, "output": output, "logs": {"l": logs}, "metrics": metrics,
                       "error": result.error, "error_kind": result.error_kind, "rows": result.rows,
                       "grad_scale": result.grad_scale, "effects": {"l": effects}, "logger_calls": {"l": calls},
                       "whole": result.whole, "validate": result.validate}}
    return json.dumps(structure, separators=(",", ":")), tensors


def decode_result(structure: Any, tensors: list[torch.Tensor]) -> StepResult:
    """The :class:`StepResult` :func:`encode_result` encoded."""
    fields = decode(structure, list(tensors))
    logs = [LoggedValue(name, value, metric, options, batch_size, weight, inferred=inferred, by_count=by_count)
            for name, value, metric, options, batch_size, weight, inferred, by_count in fields["logs"]]
    return StepResult(fields["loss"], fields["output"], logs, fields["metrics"], fields["error"], fields["rows"],
                      fields["grad_scale"], [tuple(patch) for patch in fields["effects"]],
                      [tuple(call) for call in fields["logger_calls"]], fields["error_kind"], fields["whole"],
                      fields["validate"])


def _reduce_name(reduce_fx: Any) -> Any:
    if isinstance(reduce_fx, str):
        return reduce_fx
    if reduce_fx in REDUCTION_NAMES:
        return REDUCTION_NAMES[reduce_fx]
    raise TypeError(f"reduce_fx={reduce_fx!r} cannot be sent to the other ranks; use 'mean', 'sum', 'max' or 'min'")


# -- bytes on the wire ----------------------------------------------------------------------------
def _pack(tensors: list[torch.Tensor], prefix: bytes = b"") -> bytearray:
    """``prefix`` then each tensor's bytes, every part starting at a multiple of 8."""
    out = bytearray(prefix)
    for tensor in tensors:
        out += b"\0" * (-len(out) % 8)
        if tensor.numel():  # (a metric's state probs[:, 1] at a one-row micro-batch is a one-element column)
            out += flat_bytes(tensor).numpy().tobytes()
    return out


def _unpack(data: bytearray, start: int, specs: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
    tensors = []
    buffer = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    offset = start
    for dtype_name, shape in specs:
        dtype = getattr(torch, dtype_name)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{dtype_name!r} is not a torch dtype")
        offset += -offset % 8
        count = 1
        for size in shape:
            count *= size
        nbytes = count * dtype.itemsize
        # each its own storage: views of one buffer as several dtypes cannot be saved together (torch.save of a
        # predict step's outputs), and would keep the whole message alive
        tensors.append(buffer[offset: offset + nbytes].view(dtype).reshape(shape).clone() if nbytes
                       else torch.empty(shape, dtype=dtype))
        offset += nbytes
    return tensors


_SHARE = "the step's result collective (last stage to every rank)"
_TAG = 0x5E5  # the result messages' tag on gloo (the pipeline's own messages use tag 0)
_GATHER = "the step's result all_gather over the last stage's replicas"


class ResultChannel:
    """Shares the last stage's result and compares the ranks' batch fingerprints, in one exchange per step.

    Every rank of ``group`` calls :meth:`share` once per step, in the same order; ``source`` (a global rank) passes the
    encoded result, the others ``None``.
    """

    def __init__(self, group: dist.ProcessGroup, source: int, device: torch.device) -> None:
        self.group = group
        self.source = source
        self.is_source = dist.get_rank() == source
        self.device = device  # where collectives of this group run (the CUDA device under NCCL)
        self._structure_text: str | None = None  # the last structure sent (source) or received (the others)
        self._structure: Any = None
        self._specs: list[tuple[str, list[int]]] = []
        self.timeout = DEFAULT_WAIT_TIMEOUT  # seconds a share may wait for the other ranks (the runner sets it)
        self.notice: Callable[[], Exception | None] | None = None  # a failure another rank posted (see .deadline)
        # gloo (not under NCCL's rules): messages to and from the source on a tag of their own instead of the
        # all_reduce (see post); the runner decides, on every rank alike
        self._point_to_point = False
        ranks = tuple(dist.get_process_group_ranks(group))
        self._others = [rank for rank in ranks if rank != source]
        # between ranks of one machine the messages go through Unix sockets (engine/local_link.py), made when
        # point_to_point is set, on every rank alike
        self._links: local_link.LocalLinks | None = None
        self._links_name = f"lightning_pipe/results/{'-'.join(map(str, ranks))}/{next_serial(('results', ranks))}"
        self._posted: tuple[Any, ...] | None = None  # this step's messages, posted ahead
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # the source's answers of the last step
        self._broken = False  # a step ended between post and share: its messages are still posted
        self._abandoned: list[Any] = []  # their buffers, kept while gloo may still write or read them
        self.sent_flag: bool | None = None  # what this rank's posted half said of its flag (None: nothing posted)

    @property
    def point_to_point(self) -> bool:
        return self._point_to_point

    @point_to_point.setter
    def point_to_point(self, value: bool) -> None:
        """Set on every rank right after construction: the messages' sockets are published now, before any step."""
        self._point_to_point = value
        store = default_store()
        if value and self._links is None and store is not None:
            self._links = local_link.open_links(self, store, self._links_name, dist.get_rank(),
                                                  attrgetter("timeout"))

    def post(self, fingerprint: int | torch.Tensor, flag: bool = False) -> None:
        """Point-to-point only: send the source this rank's ``fingerprint`` and ``flag`` and post the receive of its
        answer (the source: the receives of the others'), as soon as both are known, at the start of a step. The
        others' halves have then long arrived when the source finishes, so its answer waits for no one and reaches
        the others while they still compute: the step ends on a rank as soon as its own work does, with no rendezvous
        of all ranks. (gloo's all_reduce of the same words costs 0.3 to 1.5 ms on 2 ranks; a message, 0.1.)"""
        if not self.point_to_point or self._posted is not None:
            return
        if self._broken:
            raise RuntimeError("an earlier step of this pipeline failed between sending its result messages and "
                               "receiving them, so the ranks' messages no longer pair up; start a new run")
        if self._sending:  # the last step's answers, long delivered (each peer had posted its receive): their
            # buffers may go
            wait_messages([work for work, _ in self._sending], _SHARE, self._others, self.timeout, self.notice)
        self._sending = []
        if self.is_source:
            halves = [torch.empty(2, dtype=torch.int64) for _ in self._others]
            self._posted = (halves, [self._receive(half, rank) for rank, half in zip(self._others, halves)])
        else:
            mine = torch.tensor([int(fingerprint), int(flag)], dtype=torch.int64)
            answer = torch.empty(_WORDS, dtype=torch.int64)
            self._posted = (answer, [self._send(mine, self.source), self._receive(answer, self.source)], mine)
            self.sent_flag = bool(flag)

    def abandon(self) -> None:
        """The step ended with an error after :meth:`post`: its messages stay posted (the process is ending). The
        source answers every other rank with an error mark, so that one already waiting for its answer raises the
        failure the source posted to the store, rather than waiting for its deadline."""
        if self._posted is None:
            return
        arm_exit_guard()  # a receive posted to a peer that is gone must not hold this process's exit
        self._abandoned.append(self._posted)
        self._posted, self._broken = None, True
        if self.is_source:
            failed = torch.full((_WORDS,), _LOWEST, dtype=torch.int64)
            failed[2] = _FAILED
            with contextlib.suppress(Exception):  # best effort: a peer that is gone learns of it otherwise
                self._abandoned.append((failed, [self._send(failed, rank) for rank in self._others]))

    def share(self, encoded: tuple[str, list[torch.Tensor]] | None, fingerprint: int | torch.Tensor,
              flag: bool = False) -> tuple[Any, list[int] | None, bool]:
        """``((structure, tensors), fingerprints, flagged)``: the decoded structure and tensors; ``None`` when every
        rank's ``fingerprint`` is equal, else the fingerprints of all ranks in group order; whether any rank raised
        ``flag``."""
        header = torch.full((_WORDS,), _LOWEST, dtype=torch.int64)
        header[4] = int(flag)
        payload = b""
        if self.is_source:
            assert encoded is not None
            text, tensors = encoded
            structure_bytes = b"" if text == self._structure_text else text.encode()
            payload = _pack(tensors, structure_bytes)
            header[2] = len(payload)
            header[3] = len(structure_bytes) if structure_bytes else _UNCHANGED
            if len(payload) <= _INLINE:
                words = bytes(payload) + b"\0" * (-len(payload) % 8)
                if words:
                    header[_HEAD: _HEAD + len(words) // 8] = torch.frombuffer(bytearray(words), dtype=torch.int64)
        if self.point_to_point:
            words = self._exchange(header, fingerprint, flag)
        else:
            if isinstance(fingerprint, int):
                header[0], header[1] = fingerprint, -fingerprint
                header = header.to(self.device)
            else:
                header = header.to(self.device)
                fingerprint = fingerprint.to(self.device)
                header[0], header[1] = fingerprint, -fingerprint
            collective(dist.all_reduce, header, op=dist.ReduceOp.MAX, what=_SHARE, group=self.group,
                       timeout=self.timeout, notice=self.notice)
            words = header.cpu()
        fingerprints = None
        if int(words[0]) != -int(words[1]):
            fingerprints = self._gather_fingerprints(fingerprint)
        length, structure_length = int(words[2]), int(words[3])
        if length <= _INLINE:
            data = bytearray(words[_HEAD:].numpy().tobytes()[:length])
        else:
            message = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.is_source else \
                torch.empty(length, dtype=torch.uint8)
            if self.device.type != "cpu":
                message = message.to(self.device)
            collective(dist.broadcast, message, src=self.source, what=_SHARE, group=self.group, timeout=self.timeout,
                       notice=self.notice)
            data = bytearray(message.cpu().numpy().tobytes())
        if structure_length != _UNCHANGED:
            text = bytes(data[:structure_length]).decode()
            self._structure_text, self._structure = text, json.loads(text)
            self._specs = tensor_specs(self._structure, [])
            start = structure_length
        else:
            start = 0
        if self._structure_text is None:
            raise RuntimeError("a step result arrived without its structure; this is a bug, please report it")
        return (self._structure, _unpack(data, start, self._specs)), fingerprints, bool(words[4])

    def _posted_error(self, wait: float = 3.0) -> Exception | None:
        """The error the failed last stage posts, which may follow its "failed" answer by a moment (a failure at
        the step's end, after the pipeline ran); None if none comes within ``wait`` seconds."""
        if self.notice is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            posted = self.notice()
            if posted is not None or time.monotonic() >= deadline:
                return posted
            time.sleep(0.05)

    def _exchange(self, header: torch.Tensor, fingerprint: int | torch.Tensor, flag: bool) -> torch.Tensor:
        """The header every rank would get from the all_reduce, by messages: the source receives the others'
        fingerprints and flags, folds them into its header as the maximum would, and sends it to each."""
        self.post(fingerprint, flag)  # a caller that did not post at the start of its step
        assert self._posted is not None
        posted, self._posted = self._posted, None
        if not self.is_source:
            answer, works, _ = posted
            self._wait(posted, works, [self.source])
            if int(answer[2]) == _FAILED:
                self._broken = True
                raise self._posted_error() or RuntimeError(
                    f"the last stage (rank {self.source}) failed in this step; its error is in its own output")
            return answer
        halves, works = posted
        self._wait(posted, works, self._others)
        fingerprints = [int(fingerprint), *(int(half[0]) for half in halves)]
        header[0], header[1] = max(fingerprints), -min(fingerprints)
        header[4] = int(flag or any(int(half[1]) for half in halves))
        self._sending = [(self._send(header, rank), header) for rank in self._others]
        return header

    def _send(self, tensor: torch.Tensor, rank: int) -> Any:
        return local_link.send(self._links, tensor, rank, dst=rank, group=self.group, tag=_TAG)

    def _receive(self, tensor: torch.Tensor, rank: int) -> Any:
        return local_link.receive(self._links, tensor, rank, src=rank, group=self.group, tag=_TAG)

    def _wait(self, posted: tuple[Any, ...], works: list[dist.Work], peers: list[int]) -> None:
        try:
            wait_messages(works, _SHARE, peers, self.timeout, self.notice)
        except BaseException:
            self._abandoned.append(posted)  # the receives may still be posted in gloo: never pair them again
            self._broken = True
            raise

    def _gather_fingerprints(self, fingerprint: int | torch.Tensor) -> list[int]:
        size = dist.get_world_size(self.group)
        parts = [torch.empty((), dtype=torch.int64, device=self.device) for _ in range(size)]
        mine = torch.as_tensor(fingerprint, dtype=torch.int64).to(self.device).reshape(())
        collective(dist.all_gather, parts, mine, what=_SHARE, group=self.group, timeout=self.timeout,
                   notice=self.notice)
        return [int(part) for part in parts]


def gather_results(encoded: tuple[str, list[torch.Tensor]], group: dist.ProcessGroup,
                   device: torch.device, timeout: float = DEFAULT_WAIT_TIMEOUT) -> list[StepResult]:
    """Every rank's result of ``group`` on every rank (the last stages of data-parallel replicas): two all_gathers,
    of the sizes and of the padded bytes; nothing pickled."""
    text, tensors = encoded
    structure = text.encode()
    payload = _pack(tensors, structure)
    size = dist.get_world_size(group)
    lengths = [torch.empty(2, dtype=torch.int64, device=device) for _ in range(size)]
    collective(dist.all_gather, lengths, torch.tensor([len(payload), len(structure)], dtype=torch.int64, device=device),
               what=_GATHER, group=group, timeout=timeout)
    sizes = [(int(n[0]), int(n[1])) for n in (t.cpu() for t in lengths)]
    longest = max(n for n, _ in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(payload)] = torch.frombuffer(payload, dtype=torch.uint8) if payload else mine[:0]
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(size)]
    collective(dist.all_gather, parts, mine.to(device), what=_GATHER, group=group, timeout=timeout)
    results = []
    for part, (length, structure_length) in zip(parts, sizes):
        data = bytearray(part.cpu().numpy().tobytes()[:length])
        parsed = json.loads(bytes(data[:structure_length]).decode())
        results.append(decode_result(parsed, _unpack(data, structure_length, tensor_specs(parsed, []))))
    return results
