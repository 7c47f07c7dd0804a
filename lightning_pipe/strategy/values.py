"""Values as a JSON structure and raw tensor bytes: what crosses between ranks outside the pipeline's own messages.

A step's result (:mod:`.results`) and a full checkpoint's shares (:mod:`.checkpoint`) are trees of values: numbers,
strings, tensors, containers, a model's dataclass output. :func:`encode` turns such a tree into a JSON-able
structure (names, numbers, strings, each tensor's dtype and shape) and a list of tensors; :func:`pack` lays the
tensors' bytes after the structure's text, and the receiver reads them back with :func:`tensor_specs` and
:func:`unpack`, then :func:`decode`. Nothing received is unpickled: a class is rebuilt only where the receiving
process has imported it (:mod:`lightning_pipe.engine.wire`'s rules), and a value the encoding cannot carry is an error
naming it and how to send it instead.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter, OrderedDict, defaultdict, namedtuple
from collections.abc import Mapping
from typing import Any

import torch

from lightning_pipe.engine.tree import dataclass_values, rebuild_mapping
from lightning_pipe.engine.wire import (
    flat_bytes,
    imported_class,
    is_namedtuple_class,
    rebuilt_dataclass,
    refuse_local_class,
)

__all__ = ["encode", "sendable", "decode", "tensor_specs", "pack", "unpack"]


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
        tensors.append(_plain(value).detach().cpu().contiguous())
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
    if type(value) is defaultdict and _factory_name(value.default_factory) is not False:  # a defaultdict(list)
        return {"F": [_factory_name(value.default_factory), encode(dict(value), tensors, where, advice, path)]}
    if isinstance(value, Mapping):  # a mapping of one's own class (an OrderedDict subclass, a BatchEncoding)
        refuse_local_class(kind, sent_at, TypeError)
        return {"m": [kind.__module__, kind.__qualname__, encode(dict(value), tensors, where, advice, path)]}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple of one's own
        if not _namedtuple_travels(kind):
            refuse_local_class(kind, sent_at, TypeError)
            raise TypeError(f"cannot send {sent_at}, a {kind.__qualname__}: a namedtuple class the other ranks "
                            f"cannot find by its name nor make again; define it at module level, or send a dict")
        items = [encode(item, tensors, where, advice, f"{path}[{index}]") for index, item in enumerate(value)]
        if not _found_by_name(kind):  # made in a function (pytorch-forecasting's outputs, found by review): made
            # again from its name, fields and bases where it arrives
            return {"n": [kind.__module__, kind.__qualname__, items, list(value._fields), _bases(kind)]}
        return {"n": [kind.__module__, kind.__qualname__, items]}
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
    """Whether :func:`encode` carries ``value`` (a tensor: a dense or sparse COO one, of torch's own type or of a
    subclass holding its own data, which arrives as a plain tensor)."""
    if isinstance(value, torch.Tensor):
        return (type(value) in (torch.Tensor, torch.nn.Parameter) or _holds_its_data(type(value))) \
            and value.layout in (torch.strided, torch.sparse_coo)
    if value is None or isinstance(value, (bool, str, torch.dtype, torch.device)) or type(value) in (int, float):
        return True
    local = "<locals>" in type(value).__qualname__  # (a class defined in a function: refused by encode)
    if isinstance(value, Mapping) and not local:
        return all(sendable(key) and sendable(item) for key, item in value.items())
    if type(value) in (list, tuple) or _return_type(value) is not None or \
            isinstance(value, tuple) and hasattr(value, "_fields") and _namedtuple_travels(type(value)):
        return all(sendable(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not local:
        return all(sendable(item) for item in dataclass_values(value).values())
    return _numpy_kind(value) is not None


def _holds_its_data(kind: type) -> bool:
    """Whether a tensor subclass keeps its values in its own storage, adding only Python-level behaviour (MONAI's
    ``MetaTensor``: every tensor of a MONAI step is one; found by review, refused as "cannot be sent"), unlike a
    wrapper that dispatches its operations elsewhere (a ``DTensor``, a quantized tensor), whose data is not its own."""
    return getattr(kind, "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__ \
        and not issubclass(kind, torch.nn.Parameter)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as torch's own type: a subclass's data, without its class (which the other ranks make no more)."""
    return tensor if type(tensor) in (torch.Tensor, torch.nn.Parameter) else tensor.as_subclass(torch.Tensor)


def _found_by_name(kind: type) -> bool:
    """Whether ``kind`` is what its module's attribute of its qualified name holds (a class defined at module level)."""
    found: Any = sys.modules.get(kind.__module__)
    for name in kind.__qualname__.split("."):
        found = getattr(found, name, None)
    return found is kind


def _namedtuple_travels(kind: type) -> bool:
    """Whether a namedtuple class can be made again where it arrives: found there by its name, or made in a function
    on bases that are (:func:`_bases`)."""
    return _found_by_name(kind) or _bases(kind) is not None


def _bases(kind: type) -> list[list[str] | None] | None:
    """The bases of a namedtuple class made in a function: each a class found by its module and name, as [module,
    qualified name], or None for the namedtuple of its fields (pytorch-forecasting's ``class Output(OutputMixIn,
    namedtuple("output", fields))``); None where a base is neither."""
    if is_namedtuple_class(kind) and kind.__bases__ == (tuple,):  # (namedtuple's own class)
        return []
    bases: list[list[str] | None] = []
    for base in kind.__bases__:
        if is_namedtuple_class(base) and base.__bases__ == (tuple,):
            bases.append(None)
        elif _found_by_name(base) and _plain_base(base):
            bases.append([base.__module__, base.__qualname__])
        else:
            return None
    return bases if bases.count(None) == 1 else None


def _plain_base(found: type) -> bool:
    """A class a received namedtuple may be made on: no metaclass and no ``__init_subclass__`` of its own (making the
    class runs no code of it)."""
    return type(found) is type and not any("__init_subclass__" in vars(klass) for klass in found.__mro__[:-1])


_LOCAL_NAMEDTUPLES: dict[tuple[str, str, tuple[str, ...], tuple[tuple[str, ...], ...]], type] = {}


def _local_namedtuple(module: Any, qualname: Any, fields: Any, bases: Any) -> type:
    """A namedtuple class made in a function where it was sent, made again from its name, fields and bases (once: the
    same class for every message)."""
    if not (isinstance(module, str) and isinstance(qualname, str) and isinstance(fields, list)
            and all(isinstance(field, str) and field.isidentifier() and not field.startswith("_") for field in fields)
            and isinstance(bases, list) and all(base is None or isinstance(base, list) and len(base) == 2
                                                and all(isinstance(part, str) for part in base) for base in bases)
            and bases.count(None) <= 1):
        raise ValueError("a namedtuple made in a function is sent with its module, name, fields and bases")
    key = (module, qualname, tuple(fields), tuple(tuple(base) if base else () for base in bases))
    if key not in _LOCAL_NAMEDTUPLES:
        name = qualname.rsplit(".", 1)[-1]
        tupled = namedtuple(name if name.isidentifier() else "output", fields)  # type: ignore[misc]
        made = tupled if not bases else type(name, tuple(
            tupled if base is None else imported_class(*base, "base class", _plain_base) for base in bases), {})
        made.__module__, made.__qualname__ = module, qualname
        _LOCAL_NAMEDTUPLES[key] = made
    return _LOCAL_NAMEDTUPLES[key]


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
    if kind == "F":
        factory = None if body[0] is None else imported_class(*body[0], "default factory", lambda found: True)
        return defaultdict(factory, decode(body[1], tensors))
    if kind == "m":
        cls = imported_class(body[0], body[1], "mapping class", lambda found: issubclass(found, Mapping))
        return rebuild_mapping(cls, decode(body[2], tensors))
    if kind == "n":
        cls = _local_namedtuple(*body[:2], *body[3:]) if len(body) == 5 else \
            imported_class(body[0], body[1], "namedtuple", is_namedtuple_class)
        return cls(*(decode(item, tensors) for item in body[2]))
    if kind == "r":
        name, items = body
        made = getattr(torch.return_types, name, None) if isinstance(name, str) else None
        if not (isinstance(made, type) and issubclass(made, tuple) and made.__module__ == "torch.return_types"):
            raise ValueError(f"unknown result type {name!r} in a step result")  # never made: anything but those
        return made(tuple(decode(item, tensors) for item in items))
    raise ValueError(f"unknown kind {kind!r} in a step result")


def _factory_name(factory: Any) -> list[str] | None | bool:
    """A defaultdict's factory as [module, qualname] where every rank can find it (a class: ``list``, ``int``, one of
    a module's own), None for none, False for one that cannot be sent (a lambda: the dict then travels as a dict)."""
    if factory is None:
        return None
    if isinstance(factory, type) and "<locals>" not in factory.__qualname__:
        return [factory.__module__, factory.__qualname__]
    return False


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
        elif kind == "F":
            tensor_specs(body[1], specs)
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


# -- bytes on the wire ----------------------------------------------------------------------------
def pack(tensors: list[torch.Tensor], prefix: bytes = b"") -> bytearray:
    """``prefix`` then each tensor's bytes, every part starting at a multiple of 8."""
    out = bytearray(prefix)
    for tensor in tensors:
        out += b"\0" * (-len(out) % 8)
        if tensor.numel():  # (a metric's state probs[:, 1] at a one-row micro-batch is a one-element column)
            out += flat_bytes(tensor).numpy().tobytes()
    return out


def unpack(data: bytearray, start: int, specs: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
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
