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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine import local_link
from lightning_pipe.engine.deadline import collective, wait_messages
from lightning_pipe.engine.notices import default_store
from lightning_pipe.engine.runtime import next_serial
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT, arm_exit_guard
from lightning_pipe.strategy.logs import REDUCTION_NAMES, LoggedValue
from lightning_pipe.strategy.values import decode, encode, pack, tensor_specs, unpack

__all__ = ["StepResult", "ResultChannel", "encode_result", "decode_result", "gather_results"]

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
    weighed_rows: int | None = None  # where micro-batches counting nothing weighed nothing ("auto"): the others' rows
    batch_writes: dict[str, Any] | None = None  # what the step set on its batch (.batch_writes)
    returns_batch: bool = False  # the evaluation step returned its batch (each micro-batch's itself)


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
    writes = encode(result.batch_writes, tensors, f"what {step} set on its batch")
    structure = {"s": {"loss": loss, "output": output, "logs": {"l": logs}, "metrics": metrics,
                       "error": result.error, "error_kind": result.error_kind, "rows": result.rows,
                       "grad_scale": result.grad_scale, "effects": {"l": effects}, "logger_calls": {"l": calls},
                       "whole": result.whole, "validate": result.validate, "weighed_rows": result.weighed_rows,
                       "batch_writes": writes,
                       "returns_batch": result.returns_batch}}
    return json.dumps(structure, separators=(",", ":")), tensors


def decode_result(structure: Any, tensors: list[torch.Tensor]) -> StepResult:
    """The :class:`StepResult` :func:`encode_result` encoded."""
    fields = decode(structure, list(tensors))
    logs = [LoggedValue(name, value, metric, options, batch_size, weight, inferred=inferred, by_count=by_count)
            for name, value, metric, options, batch_size, weight, inferred, by_count in fields["logs"]]
    return StepResult(fields["loss"], fields["output"], logs, fields["metrics"], fields["error"], fields["rows"],
                      fields["grad_scale"], [tuple(patch) for patch in fields["effects"]],
                      [tuple(call) for call in fields["logger_calls"]], fields["error_kind"], fields["whole"],
                      fields["validate"], fields["weighed_rows"], fields["batch_writes"],
                      fields["returns_batch"])


def _reduce_name(reduce_fx: Any) -> Any:
    if isinstance(reduce_fx, str):
        return reduce_fx
    if reduce_fx in REDUCTION_NAMES:
        return REDUCTION_NAMES[reduce_fx]
    raise TypeError(f"reduce_fx={reduce_fx!r} cannot be sent to the other ranks; use 'mean', 'sum', 'max' or 'min'")


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
            payload = pack(tensors, structure_bytes)
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
        return (self._structure, unpack(data, start, self._specs)), fingerprints, bool(words[4])

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
    payload = pack(tensors, structure)
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
        results.append(decode_result(parsed, unpack(data, structure_length, tensor_specs(parsed, []))))
    return results
