"""How a tree of tensors travels between ranks as bytes: a fixed header, the tree's layout as JSON, the tensors' bytes.

Nothing received is unpickled: bytes from another process are data, never code. The layout says the tree's structure
(tuples, lists, dicts, namedtuples, dataclasses), each tensor's dtype, shape and requires-grad flag, and the tree's
other leaves, which must be JSON values (``None``, ``bool``, ``int``, ``float``, ``str``) and come back exactly (a
float by its ``repr``, so ``-0.0`` and ``nan`` too). A namedtuple or a dataclass is named by module and qualified
name and rebuilt only from a module the receiving process has already imported, and only if it is a tuple class
with ``_fields`` (a dataclass: one, its fields set as they were sent, without its constructor).

A message is ``header | layout | data``. The header (:data:`HEADER`, 16 bytes) holds the message kind and the lengths
of the layout and of the data. Each tensor starts at a multiple of :data:`ALIGN` bytes, so its bytes can be viewed as
any dtype without a copy.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .tree import dataclass_values

__all__ = ["WireError", "HEADER", "ALIGN", "DATA", "LAYOUT", "SIDE", "Channel", "aligned", "describe", "encode_layout",
           "decode_layout", "rebuild", "tensor_sizes", "read_header", "host_bytes", "flat_bytes", "write_host",
           "message_pieces", "as_received", "imported_class", "is_namedtuple_class",
           "rebuilt_dataclass", "refuse_local_class"]

HEADER = struct.Struct("<BBHIQ")  # kind, 1 reserved byte, 2 reserved bytes, layout length, data length
ALIGN = 16
DATA, LAYOUT, SIDE = 0, 1, 2  # the channel's layout, unchanged | a new layout in this message | on the side plane
_KINDS = (DATA, LAYOUT, SIDE)

_DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_DEPTH = 100


class WireError(ValueError):
    """A tree that cannot be sent (a leaf that is neither a tensor nor a JSON value), or bytes that are not a message
    this transport wrote."""


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


# -- sending ---------------------------------------------------------------------------------------
def describe(tree: Any) -> tuple[list[torch.Tensor], tuple]:
    """The tensor leaves of ``tree`` in depth-first order and its layout: plain nested tuples, equal for two trees
    exactly when the receiver would rebuild them alike, so a sender compares it with the last one it sent."""
    leaves: list[torch.Tensor] = []
    return leaves, _describe(tree, leaves, "tree", 0)


def _describe(tree: Any, leaves: list[torch.Tensor], path: str, depth: int) -> tuple:
    if depth > _MAX_DEPTH:
        raise WireError(f"{path}: the tree is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return ("T", _NAMES[tree.dtype], tuple(tree.shape), tree.requires_grad)
    kind = type(tree)
    if kind is torch.Size:  # (a shape passed on beside the activations: a torch.Size again, not a tuple)
        return ("Z", tuple(tree))
    if kind is tuple or (isinstance(tree, tuple) and not hasattr(tree, "_fields")):
        return ("t", tuple(_describe(child, leaves, f"{path}[{i}]", depth + 1) for i, child in enumerate(tree)))
    if isinstance(tree, tuple):  # a namedtuple
        refuse_local_class(kind, path, WireError)
        children = tuple(_describe(child, leaves, f"{path}.{name}", depth + 1)
                         for name, child in zip(tree._fields, tree))
        return ("n", kind.__module__, kind.__qualname__, children)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        refuse_local_class(kind, path, WireError)
        children = tuple((name, _describe(value, leaves, f"{path}.{name}", depth + 1))
                         for name, value in dataclass_values(tree).items())
        return ("c", kind.__module__, kind.__qualname__, children)
    if isinstance(tree, list):
        return ("l", tuple(_describe(child, leaves, f"{path}[{i}]", depth + 1) for i, child in enumerate(tree)))
    if isinstance(tree, dict):
        return ("d", tuple((_value(key, f"{path} key {key!r}"), _describe(child, leaves, f"{path}[{key!r}]", depth + 1))
                           for key, child in tree.items()))
    return _value(tree, path)


def _value(value: Any, path: str) -> tuple:
    kind = type(value)
    if value is None:
        return ("N",)
    if kind is bool:
        return ("B", value)
    if kind is int:
        return ("I", value)
    if kind is float:
        return ("F", repr(value))  # repr round-trips every float exactly, -0.0, inf and nan included
    if kind is str:
        return ("S", value)
    if kind is torch.dtype:  # (a layer passing the dtype to compute in, beside its activations)
        return ("D", _NAMES[value])
    if kind is torch.device:
        return ("V", str(value))
    raise WireError(f"cannot send {path}, a {kind.__module__}.{kind.__qualname__}: only tensors, JSON values "
                    f"(None, bool, int, float, str) and torch's dtypes and devices cross ranks, in tuples, lists, "
                    f"dicts, namedtuples and dataclasses; make it a "
                    f"tensor or one of those")


def encode_layout(layout: tuple) -> bytes:
    return json.dumps(layout, separators=(",", ":"), allow_nan=False).encode()


def tensor_sizes(layout_tensors: list[tuple[torch.dtype, tuple[int, ...], bool]]) -> list[int]:
    """Bytes of each tensor of a decoded layout."""
    sizes = []
    for dtype, shape, _ in layout_tensors:
        count = 1
        for n in shape:
            count *= n
        sizes.append(count * dtype.itemsize)
    return sizes


# -- what both ends keep per channel, and writing a message in host memory ---------------------------
class Channel:
    """What both ends know of one ``(peer, channel)``: the last layout and the size of every message."""

    __slots__ = ("layout", "spec", "capacity", "sizes", "data_len", "places")

    def __init__(self, initial_capacity: int) -> None:
        self.layout: tuple | None = None
        self.spec: Any = None  # receiving end: how to rebuild the tree
        self.capacity = initial_capacity
        self.sizes: list[int] = []  # bytes of each tensor of the layout
        self.data_len = 0  # bytes of the data, each tensor aligned
        self.places: list[tuple[int, int, torch.dtype, tuple[int, ...], bool]] = []  # receiving end: (offset in the
        # data, bytes, dtype, shape, requires_grad) of each tensor

    def set_layout(self, layout: tuple, sizes: list[int]) -> None:
        self.layout, self.sizes, self.data_len = layout, sizes, sum(aligned(n) for n in sizes)

    def set_received(self, layout: tuple, spec: Any, tensors: list[tuple[torch.dtype, tuple[int, ...], bool]]) -> None:
        """The receiving end's layout, as :func:`decode_layout` read it: where each tensor lies in the data."""
        sizes = tensor_sizes(tensors)
        self.set_layout(layout, sizes)
        self.spec = spec
        self.places, offset = [], 0
        for nbytes, (dtype, shape, requires_grad) in zip(sizes, tensors):
            self.places.append((offset, nbytes, dtype, shape, requires_grad))
            offset += aligned(nbytes)


def as_received(tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A received tensor as the sender's was: a leaf of its own, needing a gradient where that one did, with a
    version counter of its own (``.data``; ``.detach()`` would share the message's): the tensors of one message are
    views of its buffer, and a stage writing one in place (a mask, a PyG-style ``index_add_`` into zeros) made
    autograd take every other one saved for backward as changed."""
    return tensor.data.requires_grad_(requires_grad)


_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.complex64, torch.complex128, torch.int64,
                           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


def host_bytes(tensor: torch.Tensor) -> memoryview | None:
    """The bytes of a contiguous CPU tensor, without a copy; ``None`` where numpy cannot view them (bfloat16, a
    conjugate or negative view, another device)."""
    if tensor.dtype not in _NUMPY_DTYPES or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    try:
        return memoryview(tensor.detach().numpy()).cast("B")
    except (TypeError, RuntimeError, ValueError):
        return None


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values as one flat uint8 tensor where it is: conjugate and negative views resolved, copied where
    its elements do not lie one after another (also a one-element column, ``h[:1, 1]``, which counts as contiguous
    with its stride)."""
    flat = tensor.detach().resolve_conj().resolve_neg().reshape(-1)
    if flat.stride(0) != 1:
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def write_host(message: torch.Tensor, head: bytes, leaves: list[torch.Tensor], sizes: list[int], start: int) -> None:
    """``head`` at the start of ``message`` (host memory) and each of ``leaves`` from ``start`` on, aligned: by the
    bytes where numpy can view them, else by torch's copy."""
    view = memoryview(message.numpy())
    view[: len(head)] = head
    offset = start
    for tensor, nbytes in zip(leaves, sizes):
        if nbytes:
            source = host_bytes(tensor)
            if source is not None:
                view[offset: offset + nbytes] = source
            else:
                message[offset: offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
        offset += aligned(nbytes)


def message_pieces(head: bytes, leaves: list[torch.Tensor], sizes: list[int], start: int, total: int) -> list:
    """The message :func:`write_host` would write, ``total`` bytes, as pieces: ``head``, zeros up to ``start``, each
    tensor's bytes where they lie (a contiguous copy where numpy cannot view them), zeros between and after."""
    pieces: list = [head]
    written, offset = len(head), start
    for tensor, nbytes in zip(leaves, sizes):
        if nbytes:
            if offset > written:
                pieces.append(_zeros(offset - written))
            data = host_bytes(tensor)
            if data is None:
                data = memoryview(flat_bytes(tensor.cpu()).numpy())
            pieces.append(data)
            written = offset + nbytes
        offset += aligned(nbytes)
    if total > written:
        pieces.append(_zeros(total - written))
    return pieces


_ZEROS = memoryview(bytes(1 << 16))


def _zeros(nbytes: int) -> memoryview:
    global _ZEROS
    if nbytes > len(_ZEROS):
        _ZEROS = memoryview(bytes(nbytes))
    return _ZEROS[:nbytes]


# -- receiving -------------------------------------------------------------------------------------
def decode_layout(data: bytes) -> tuple[tuple, Any, list[tuple[torch.dtype, tuple[int, ...], bool]]]:
    """Read a layout sent by :func:`encode_layout`: ``(layout, spec for rebuild, tensors' (dtype, shape,
    requires_grad))``. Raises :class:`WireError` for anything that is not such a layout."""
    try:
        raw = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise WireError(f"a message's layout is not valid JSON ({error}); was it written by this transport?") from None
    tensors: list[tuple[torch.dtype, tuple[int, ...], bool]] = []
    spec, layout = _read(raw, tensors, 0)
    return layout, spec, tensors


def _fail(why: str) -> WireError:
    return WireError(f"a message's layout is malformed: {why}")


def _read(raw: Any, tensors: list, depth: int) -> tuple[Any, tuple]:
    """``(spec, layout)`` of one node: the spec rebuilds the tree, the layout equals what :func:`describe` gave."""
    if depth > _MAX_DEPTH or not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise _fail(f"{str(raw)[:80]!r} is not a node")
    tag, body = raw[0], raw[1:]
    if tag == "T":
        if len(body) != 3:
            raise _fail("a tensor needs dtype, shape and requires_grad")
        name, shape, requires_grad = body
        if name not in _DTYPES or not isinstance(shape, list) or type(requires_grad) is not bool \
                or not all(type(n) is int and n >= 0 for n in shape):
            raise _fail(f"bad tensor description {body!r}")
        dtype = _DTYPES[name]
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise WireError(f"a layout asks for a gradient of a {dtype} tensor, which cannot have one")
        tensors.append((dtype, tuple(shape), requires_grad))
        return ("T",), ("T", name, tuple(shape), requires_grad)
    if tag in ("t", "l"):
        if len(body) != 1 or not isinstance(body[0], list):
            raise _fail(f"a {tag!r} node holds one list of children")
        read = [_read(child, tensors, depth + 1) for child in body[0]]
        return (tag, tuple(s for s, _ in read)), (tag, tuple(lay for _, lay in read))
    if tag == "n":
        if len(body) != 3 or not all(isinstance(x, str) for x in body[:2]) or not isinstance(body[2], list):
            raise _fail("a namedtuple node holds module, qualified name and children")
        read = [_read(child, tensors, depth + 1) for child in body[2]]
        cls = imported_class(body[0], body[1], "namedtuple", is_namedtuple_class)
        return ("n", cls, tuple(s for s, _ in read)), ("n", body[0], body[1], tuple(lay for _, lay in read))
    if tag == "c":
        if len(body) != 3 or not all(isinstance(x, str) for x in body[:2]) or not isinstance(body[2], list) \
                or not all(isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) for item in body[2]):
            raise _fail("a dataclass node holds module, qualified name and (field, child) pairs")
        read = [(name, _read(child, tensors, depth + 1)) for name, child in body[2]]
        cls = imported_class(body[0], body[1], "dataclass", dataclasses.is_dataclass)
        return (("c", cls, tuple((name, spec) for name, (spec, _) in read)),
                ("c", body[0], body[1], tuple((name, layout) for name, (_, layout) in read)))
    if tag == "d":
        if len(body) != 1 or not isinstance(body[0], list):
            raise _fail("a dict node holds one list of (key, child) pairs")
        specs, layouts = [], []
        for item in body[0]:
            if not isinstance(item, list) or len(item) != 2:
                raise _fail("a dict item is a (key, child) pair")
            (_, key), key_layout = _read_value(item[0])
            spec, layout = _read(item[1], tensors, depth + 1)
            specs.append((key, spec))
            layouts.append((key_layout, layout))
        return ("d", tuple(specs)), ("d", tuple(layouts))
    return _read_value(raw)


def _read_value(raw: Any) -> tuple[tuple, tuple]:
    if not isinstance(raw, list) or not raw:
        raise _fail(f"{str(raw)[:80]!r} is not a value")
    tag, body = raw[0], raw[1:]
    if tag == "N" and not body:
        return ("v", None), ("N",)
    if len(body) == 1:
        value = body[0]
        if tag == "B" and type(value) is bool or tag == "I" and type(value) is int or tag == "S" and type(value) is str:
            return ("v", value), (tag, value)
        if tag == "Z" and isinstance(value, list) and all(type(n) is int and n >= 0 for n in value):
            return ("v", torch.Size(value)), (tag, tuple(value))
        if tag == "D" and type(value) is str and value in _DTYPES:
            return ("v", _DTYPES[value]), (tag, value)
        if tag == "V" and type(value) is str:
            try:
                return ("v", torch.device(value)), (tag, value)
            except RuntimeError:
                pass
        if tag == "F" and type(value) is str:
            try:
                return ("v", float(value)), ("F", value)
            except ValueError:
                pass
    raise _fail(f"{str(raw)[:80]!r} is not a value")


def is_namedtuple_class(found: type) -> bool:
    return issubclass(found, tuple) and hasattr(found, "_fields")


def imported_class(module: str, qualname: str, what: str, is_one: Callable[[type], bool]) -> type:
    """The class ``module.qualname`` (a namedtuple or dataclass: ``what``, checked by ``is_one``), from a module this
    process has imported already (nothing is imported on a peer's say-so), and only if it is one."""
    found: Any = sys.modules.get(module)
    for part in qualname.split(".") if found is not None else ():
        found = getattr(found, part, None) if part.isidentifier() else None
    if not (isinstance(found, type) and is_one(found)):
        raise WireError(f"cannot rebuild {what} {module}.{qualname}: no such {what} class in a module this "
                        f"process has imported; import {module} on every rank before running the pipeline")
    return found


def rebuilt_dataclass(cls: type, values: dict[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` holding ``values`` as the sender's did: made without its constructor,
    whose ``__post_init__`` would transform them again (a scale applied twice) or drop a field set after it (found by
    review); one that is also a dict (Hugging Face's ``ModelOutput``) holds its fields that are not None as items,
    as its ``__post_init__`` puts them."""
    names = {field.name for field in dataclasses.fields(cls)}
    if set(values) - names:
        raise _fail(f"a dataclass node of {cls.__qualname__} names fields it does not have: "
                    f"{sorted(set(values) - names)}")
    made = cls.__new__(cls)
    for name, value in values.items():
        object.__setattr__(made, name, value)
    if isinstance(made, dict):
        put = next(base.__setitem__ for base in type(made).__mro__ if base in (OrderedDict, dict))
        for name, value in values.items():
            if value is not None:
                put(made, name, value)
    return made


def refuse_local_class(kind: type, path: str, error: type[Exception]) -> None:
    """Refuse, where it is sent, an instance of a class defined inside a function, which no other rank can find by
    its module and name."""
    if "<locals>" in kind.__qualname__:
        raise error(f"cannot send {path}, a {kind.__qualname__}: a class defined inside a function, which the other "
                    f"ranks cannot find by its name; define it at module level (of a module every rank imports), or "
                    f"send a dict")


def rebuild(spec: Any, leaves: list[torch.Tensor]) -> Any:
    """The tree of a decoded layout's ``spec`` with ``leaves`` (in order) in its tensors' places."""
    if spec[0] == "T":  # one tensor, the common message
        return leaves[0]
    return _rebuild(spec, iter(leaves))


def _rebuild(spec: Any, leaves: Any) -> Any:
    tag = spec[0]
    if tag == "T":
        return next(leaves)
    if tag == "v":
        return spec[1]
    if tag == "t":
        return tuple(_rebuild(child, leaves) for child in spec[1])
    if tag == "l":
        return [_rebuild(child, leaves) for child in spec[1]]
    if tag == "n":
        return spec[1](*(_rebuild(child, leaves) for child in spec[2]))
    if tag == "c":
        return rebuilt_dataclass(spec[1], {name: _rebuild(child, leaves) for name, child in spec[2]})
    return {key: _rebuild(child, leaves) for key, child in spec[1]}


def read_header(data: bytes) -> tuple[int, int, int]:
    """``(kind, layout length, data length)`` of a message's first :data:`HEADER` bytes."""
    kind, _, _, layout_len, data_len = HEADER.unpack(data)
    if kind not in _KINDS:
        raise WireError(f"a message has kind {kind}, which this transport never writes")
    return kind, layout_len, data_len
