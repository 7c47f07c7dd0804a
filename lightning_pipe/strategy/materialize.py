"""A module built on the meta device gets storage only where this rank needs it: its own layers and the code around them.

A model too big for one device is built without storage (``configure_model`` or ``Trainer.init_module(empty_init=True)``
under this strategy, or ``with torch.device("meta")``), cut like any other, and then each rank materializes only the
layers of its stages, plus what lies outside the pipelined ``nn.Sequential`` (the step code's buffers, which every rank
runs): :class:`LocalMaterializer` is the engine's ``Pipeline(materialize=...)`` hook, called with this rank's stage
modules before they move to the device. The other layers stay on the meta device and are dropped with the cut.

Each materialized tensor is new storage on the device (``to_empty``), given to every module that refers to the old one
(a parameter tied across layers stays one tensor). Values come from the modules' own initialization, run per module in
the module tree's order with torch's generators forked to a seed of the agreed seed and the module's name, so a
meta-built model starts from the same weights on every layout (but not from the weights an eager build draws, which
come from one stream in construction order):

- a tensor given a source (the original of a precision's conversion deferred to the cut,
  :mod:`~lightning_pipe.strategy.conversion`), or a value by a ``load_state_dict`` while the module was built
  (:mod:`~lightning_pipe.strategy.host_built`), takes its value from it, and no initializer runs for it;

- what the module's construction computed for the tensor, computed again from the operations recorded while it was
  built in the strategy's block (:mod:`~lightning_pipe.strategy.recorded_init`: a rope table, a position table, a
  parameter made with ``torch.zeros``, an enclosing model's ``self.apply(self._init_weights)``, a Hugging Face model's
  own initialization, which the block runs on meta to record it), where every value it depends on was recorded;
- then, for what a Hugging Face model still leaves unwritten, its ``_init_weights`` applied to the modules holding it
  and their parents, in post-order, as its ``initialize_weights`` applies it
  (:meth:`LocalMaterializer._hugging_face_pass`);
- then, per module, for tensors still unwritten (a module built outside the strategy's block, ``with
  torch.device("meta")``, has no recording): ``module.reset_parameters()`` where the module that owns the tensor
  defines it (torch's layers do; it must initialize the module's own parameters and buffers);
- then the nearest other enclosing ``_init_weights(module)``; what an earlier one wrote stays. A write counts however
  it is made (in place, through ``.data``, or by assigning the tensor anew, whose value then goes into the placed
  tensor): fresh floating tensors start as NaN;
- else nothing: the tensor must come from a checkpoint (``trainer.fit(model, ckpt_path=...)``). Before the first step
  the strategy checks that each such tensor was written since (:meth:`LocalMaterializer.unwritten`: its version counter
  moved) and names the module and the fix otherwise. A non-persistent buffer (a rope table) is in no checkpoint, so
  one that nothing recomputes is an error right away.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from lightning_pipe.capture.materialize import put_in_place
from lightning_pipe.strategy.host_built import copy_sources, forget_loads, loaded_values, own_tensors
from lightning_pipe.strategy.randomness import derive_seed, forked_random, name_digest
from lightning_pipe.strategy.init_replay import flows, replay, storage_names
from lightning_pipe.strategy.recorded_init import forget_recording, not_replayed

__all__ = ["has_meta_tensors", "LocalMaterializer", "meta_like", "refuse_planned_cut"]

_INIT_STREAM = 13  # derived seeds of the modules' initialization (see strategy/randomness.Stream)
_NOT_REPLAYED = ("what their construction computed could not be computed again (the model was built outside the "
                 "strategy's configure_model() or Trainer.init_module(), or from a tensor made before it, or "
                 "initialized by a function of the project's that skips meta tensors: build the model in "
                 "__init__, or give the values with a checkpoint)")


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether some parameter or buffer of ``module`` has no storage (built on the meta device)."""
    return any(t.is_meta for t in _tensors(module))


def refuse_planned_cut(module: nn.Module, planned: bool) -> None:
    """A planned cut profiles every layer on rank 0, which a module without storage cannot run."""
    if planned and has_meta_tensors(module):
        raise ValueError(f"{type(module).__name__} was built on the meta device (configure_model, "
                         f"Trainer.init_module(empty_init=True)), but a planned cut (partition='profile', 'time' or "
                         f"'memory', or schedule='auto') runs every layer on rank 0 to profile it; cut with "
                         f"partition='uniform', 'parameters' or a list of layer counts")


def _tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


class LocalMaterializer:
    """Materializes this rank's share of ``module`` (whose pipelined sequence is ``sequence``) on ``device``.

    ``seed`` (agreed by every rank) seeds the modules' initialization. Call it with the stage modules this rank holds.
    """

    def __init__(self, module: nn.Module, sequence: nn.Module, device: torch.device, seed: int,
                 holders: Sequence[nn.Module] = (), whole_buffers: bool = False,
                 sources: dict[int, torch.Tensor] | None = None) -> None:
        self.module = module
        self.sequence = sequence
        self.device = torch.device(device)
        self.seed = int(seed)
        # other module trees that refer to the same tensors (a captured model's segments): they get the new tensors too
        self.holders = list(holders)
        # every buffer of ``sequence`` on every rank (a captured model's: as one built eagerly keeps its buffers whole,
        # since a later capture may have a segment recompute from a rope table what the first one sent it)
        self.whole_buffers = whole_buffers
        # meta tensors whose values come from other tensors (a precision's conversion deferred to the cut, see
        # strategy/conversion.py), by id: copied in where this rank keeps them (each let go once copied), the rest
        # dropped with the cut. The caller's dict itself, emptied as it goes: no other reference keeps them.
        self.sources = sources if sources is not None else {}
        # values a load_state_dict copied into meta tensors while the module was built (host_built), by tensor id
        self._loaded = loaded_values(module)
        # a module deep-copied from another while built (an EMA teacher) is initialized as its source, by its name
        self._seed_names = copy_sources(module)
        # whether some tensor gets its initial value from an initializer (else every value is given: no warning); not
        # a non-persistent buffer, which no state dict holds, so none can be loaded: a rope table (Llama's inv_freq)
        # or a mask its construction computes without a draw (a user whose weights were all loaded was warned)
        transient = {id(buffer) for owner in module.modules() for name, buffer in owner._buffers.items()
                     if buffer is not None and name in owner._non_persistent_buffers_set}
        self.seeded = any(t.is_meta and id(t) not in self.sources and id(t) not in self._loaded
                          and id(t) not in transient for t in _tensors(module))
        self.materialized: list[str] = []  # names of the modules whose state this rank materialized
        # the module's own parameters that its captured forward does not read (a scale the step applies): every rank
        # keeps them (strategy/captured.py), so every rank materializes them
        self.step_state: set[str] = set()
        self._extras: set[int] = set()  # the ids of buffers materialized only because of whole_buffers
        self._metas: dict[int, torch.Tensor] = {}  # id(new tensor) -> the meta tensor it replaces, while initializing
        self._names: dict[int, str] = {}  # the meta tensors' names by storage, while initializing
        self._flows: dict[int, tuple[str, int]] = {}  # draws into temporaries: the named tensor each reaches first
        self._later: dict[int, str] = {}  # meta tensors replayed after the Hugging Face pass (its init failed on meta)
        self._unwritten: dict[str, tuple[torch.Tensor, int, str]] = {}  # name -> (tensor, version, owner description)

    @classmethod
    def for_module(cls, module: nn.Module, sequence: nn.Module, device: torch.device, seed: int,
                   holders: Sequence[nn.Module] = (), whole_buffers: bool = False,
                   sources: dict[int, torch.Tensor] | None = None) -> LocalMaterializer | None:
        """A materializer if ``module`` has tensors on the meta device, else ``None`` (built eagerly: as before)."""
        if not has_meta_tensors(module):
            return None
        return cls(module, sequence, device, seed, holders, whole_buffers, sources)

    def __call__(self, stages: Sequence[nn.Module]) -> None:
        inside = {id(t) for t in _tensors(self.sequence)}
        wanted = {id(t): t for stage in stages for t in _tensors(stage)}
        wanted.update((id(t), t) for t in _tensors(self.module) if id(t) not in inside)  # the step code's state
        wanted.update((id(t), t) for name, t in self.module.named_parameters() if name in self.step_state)
        extras: set[int] = set()  # buffers of other ranks' layers (whole_buffers)
        if self.whole_buffers:
            extras = {id(t) for t in self.sequence.buffers() if id(t) not in wanted}
            wanted.update((id(t), t) for t in self.sequence.buffers())
        fresh = {key: _empty_like(tensor, self.device) for key, tensor in wanted.items() if tensor.is_meta}
        self._metas = {id(new): wanted[key] for key, new in fresh.items()}  # for the recorded construction's replay
        self._names = storage_names(self.module)
        self._flows = flows(self._names)
        self._later = not_replayed(self.module)
        # a checkpoint loads this rank's layers only: another rank's persistent buffer nothing initialized is that
        # rank's to load, not an error here
        self._extras = {id(fresh[key]) for key in extras if key in fresh}
        owners = self._give(fresh)
        given = set()  # the new tensors whose values come from sources
        with torch.no_grad():
            for key, tensor in fresh.items():
                value = self.sources.pop(key, None)
                value = self._loaded.pop(key, None) if value is None else value
                if value is not None:
                    tensor.copy_(value)
                    given.add(id(tensor))
        self.sources.clear()  # the other ranks' originals go
        self._loaded.clear()
        forget_loads(self.module)
        try:
            self._initialize(owners, fresh, given)
            self._plain_tensors(stages)
        finally:
            self._metas, self._names, self._flows, self._later = {}, {}, {}, {}
            forget_recording()
        _refuse_meta_metrics(self.module, stages, self.sequence)

    def _plain_tensors(self, stages: Sequence[nn.Module]) -> None:
        """Plain tensor attributes made while the module was built (``self.best = torch.tensor(-inf)`` beside the
        layers in configure_model), in the step code's modules and this rank's layers: what their construction
        computed, on this rank's device; an error naming them where that cannot be known."""
        inside = {id(m) for m in self.sequence.modules()}
        local = {id(m) for stage in stages for m in stage.modules()}
        done: dict[int, torch.Tensor] = {}
        lost = []
        for name, owner in self.module.named_modules():
            if (id(owner) in inside and id(owner) not in local) or isinstance(getattr(owner, "_defaults", None), dict):
                continue  # another rank's layer, dropped with the cut; a metric (refused if built on meta)
            for key, value in list(vars(owner).items()):
                if not isinstance(value, torch.Tensor) or not value.is_meta or key.startswith("__"):
                    continue
                if id(value) not in done:
                    (computed,) = replay([value], self.seed, self._names, self._flows)
                    if computed is None:
                        lost.append(f"{name}.{key}" if name else key)
                        continue
                    done[id(value)] = computed.to(self.device).requires_grad_(value.requires_grad)
                owner.__dict__[key] = done[id(value)]
        if lost:
            raise ValueError(f"{_listed(lost)} of {type(self.module).__name__}: plain tensor attributes made on the "
                             f"meta device while the module was built (configure_model() or Trainer.init_module() "
                             f"under PipelineStrategy), whose values could not be computed again (made from a tensor "
                             f"made before the block, or by a function that skips meta tensors); make them in "
                             f"__init__ or setup()")

    def _give(self, fresh: dict[int, torch.Tensor]) -> dict[str, nn.Module]:
        """Put the new tensors in place of the meta ones, in every module that holds one; the owning modules by name."""
        owners = {name: child for name, child in self.module.named_modules(remove_duplicate=False)
                  if any(id(t) in fresh for _, t in own_tensors(child))}
        put_in_place([self.module, self.sequence, *self.holders], fresh)
        return owners

    def _initialize(self, owners: dict[str, nn.Module], fresh: dict[int, torch.Tensor], given: set[int]) -> None:
        new = {id(t) for t in fresh.values()} - given
        with torch.no_grad():
            for tensor in fresh.values():
                if id(tensor) in new and tensor.is_floating_point():
                    tensor.fill_(float("nan"))  # so that a write through .data shows too (no version bump)
        versions = {id(t): t._version for t in fresh.values()}

        def written(tensor: torch.Tensor) -> bool:
            if tensor._version != versions.get(id(tensor)) or tensor.numel() == 0:
                return True
            return tensor.is_floating_point() and not bool(torch.isnan(tensor).all())

        placed = {id(owner): dict(own_tensors(owner)) for owner in owners.values()}
        # first what the construction computed (Hugging Face's initialization recorded too); where that could not
        # run on meta, Hugging Face's pass first and the replay for what it leaves
        lost = sorted(name for name in self._later.values() if name)
        if lost:
            warnings.warn(f"the Hugging Face initialization of a model built on the meta device failed there, so each "
                          f"rank initializes its modules as Hugging Face does after materializing them; what the "
                          f"code changed in {_listed(lost)} after building the model is lost. Make those changes "
                          f"after the setup (in setup() or on_fit_start()), or build the model in __init__",
                          stacklevel=2)
        unset = [t for t in fresh.values() if id(t) in new]
        self._replay([t for t in unset if id(self._metas[id(t)]) not in self._later], written)
        self._hugging_face_pass({id(t) for t in unset if not written(t)}, placed, versions)
        self._replay([t for t in unset if id(self._metas[id(t)]) in self._later], written)
        parents = {id(child): parent for parent in self.module.modules() for child in parent.children()}
        done: set[int] = set()
        for name, owner in owners.items():
            if id(owner) in done:  # the same module under two names (shared layers)
                continue
            done.add(id(owner))
            if not any(id(t) in new for _, t in own_tensors(owner)):  # every value given
                self.materialized.append(name)
                continue
            kept = {key: t.detach().clone() for key, t in own_tensors(owner) if id(t) not in new}  # real state stays
            with torch.no_grad(), forked_random(self._seed_of(self._seed_names.get(name, name)), self.device):
                for init in _initializers(owner, parents):  # the next one only for tensors still unwritten
                    earlier = {key: t.clone() for key, t in own_tensors(owner) if id(t) in new and written(t)}
                    if all(key in earlier for key, t in own_tensors(owner) if id(t) in new):
                        break
                    init()
                    _keep_objects(owner, placed[id(owner)], versions)
                    for key, tensor in own_tensors(owner):  # what an earlier initializer wrote stays
                        if key in earlier:
                            tensor.copy_(earlier[key])
            with torch.no_grad():
                for key, tensor in own_tensors(owner):
                    if key in kept:
                        tensor.copy_(kept[key])
            for key, tensor in own_tensors(owner):
                if id(tensor) not in new or written(tensor):
                    continue
                qualified = f"{name}.{key}" if name else key
                if key in owner._non_persistent_buffers_set:
                    raise ValueError(
                        f"the buffer {qualified!r} of {type(owner).__name__} was built on the meta device and is not "
                        f"persistent, so no checkpoint holds it, and nothing recomputes it: {_NOT_REPLAYED}; give "
                        f"{type(owner).__name__} a reset_parameters() that recomputes it (as its __init__ does), or "
                        f"build the model eagerly")
                if id(tensor) not in self._extras:
                    self._unwritten[qualified] = (tensor, tensor._version, f"{qualified!r} ({type(owner).__name__})")
            self.materialized.append(name)

    def _replay(self, tensors: list[torch.Tensor], written: Callable[[torch.Tensor], bool]) -> None:
        """What the construction computed for each of ``tensors`` still unwritten, where it can be known."""
        with torch.no_grad():
            for tensor in tensors:
                if not written(tensor):
                    (value,) = replay([self._metas[id(tensor)]], self.seed, self._names, self._flows)
                    if value is not None:
                        tensor.copy_(value)

    def _hugging_face_pass(self, unwritten: set[int], placed: dict[int, dict[str, torch.Tensor]],
                           versions: dict[int, int]) -> None:
        """What the replay left unwritten in a Hugging Face model (one whose initialization on meta could not be
        recorded) is initialized as its ``initialize_weights`` does: every module in post-order by the nearest
        enclosing model's ``_init_weights``, a parent after its children (T5's attention sets its projections'
        scales, GPT-2 scales its residual projections by depth, Whisper writes its sinusoids into an embedding). Here
        for the modules holding such tensors and their parents, each under a seed of its name; every other tensor
        carries Hugging Face's ``_is_hf_initialized`` meanwhile, which its initialization functions leave alone."""
        hugging_face = _pretrained_class()
        if hugging_face is None or not unwritten:
            return
        guard = getattr(sys.modules.get("transformers.initialization"), "guard_torch_init_functions", None)
        visited: set[int] = set()

        def visit(module: nn.Module, name: str, model: nn.Module | None) -> bool:
            if id(module) in visited:
                return False
            visited.add(id(module))
            model = module if isinstance(module, hugging_face) else model
            holds = any(id(t) in unwritten for _, t in own_tensors(module))
            for child_name, child in module.named_children():
                holds |= visit(child, f"{name}.{child_name}" if name else child_name, model)
            if model is None or not holds:
                return holds
            subtree = list(module.modules())
            flagged = [t for child in subtree for _, t in own_tensors(child)
                       if id(t) not in unwritten and not getattr(t, "_is_hf_initialized", False)]
            for tensor in flagged:
                tensor._is_hf_initialized = True
            try:
                with torch.no_grad(), guard() if guard is not None else contextlib.nullcontext(), forked_random(
                        self._seed_of(f"{self._seed_names.get(name, name)}:_init_weights"), self.device):
                    model._init_weights(module)
                    for child in subtree:
                        if id(child) in placed:
                            _keep_objects(child, placed[id(child)], versions)
            finally:
                for tensor in flagged:
                    del tensor._is_hf_initialized
            return holds

        visit(self.module, "", None)

    def _seed_of(self, name: str) -> int:
        return derive_seed(self.seed, _INIT_STREAM, name_digest(name))

    def unwritten(self) -> str | None:
        """An error text if tensors that nothing initialized were still not written (by a checkpoint or the user)."""
        state = dict(self.module.named_parameters(remove_duplicate=False))
        state.update(self.module.named_buffers(remove_duplicate=False))
        left = []
        for name, (tensor, version, what) in self._unwritten.items():
            current = state.get(name, tensor)  # replaced since (a precision plugin's dtype): written if it moved
            if (current._version == version) if current is tensor else (current._version == 0):
                left.append(what)
        self._unwritten = {}
        if not left:
            return None
        return (f"{_listed(left)} were built on the meta device and nothing initialized them: their modules define no "
                f"reset_parameters() (nor does an enclosing Hugging Face model define _init_weights), and "
                f"{_NOT_REPLAYED}. Define "
                f"reset_parameters() on those modules to initialize their own parameters and buffers, as torch.nn "
                f"layers do, or load the weights from a checkpoint: trainer.fit(model, ckpt_path=...)")


def _listed(names: list[str]) -> str:
    """The first five of ``names`` and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refuse_meta_metrics(module: nn.Module, stages: Sequence[nn.Module], sequence: nn.Module) -> None:
    """torchmetrics keep their states outside parameters and buffers: on the meta device their defaults are lost."""
    inside = {id(m) for m in sequence.modules()}
    local = {id(m) for stage in stages for m in stage.modules()}
    for name, child in module.named_modules():
        if id(child) in inside and id(child) not in local:
            continue
        defaults = getattr(child, "_defaults", None)
        if isinstance(defaults, dict) and any(isinstance(v, torch.Tensor) and v.is_meta for v in defaults.values()):
            raise ValueError(f"the metric {name!r} ({type(child).__name__}) was created on the meta device, where its "
                             f"states' initial values are lost; create the metric outside it: in __init__, "
                             f"configure_model() or setup() (a metric class defined while the model is built is not "
                             f"kept off the meta device)")


def _keep_objects(owner: nn.Module, placed: dict[str, torch.Tensor], versions: dict[int, int]) -> None:
    """An initializer that assigned a tensor anew (``self.cos = ...``, as litgpt's rope tables are): its value goes
    into the tensor placed before, which goes back, since other modules (a captured model's segments, a tie) refer to
    that object; it then counts as written."""
    for table in (owner._parameters, owner._buffers):
        for key, tensor in list(table.items()):
            before = placed.get(key)
            if before is None or tensor is None or tensor is before:
                continue
            if tensor.shape != before.shape:
                raise ValueError(f"{type(owner).__name__}'s initialization replaced {key!r} of shape "
                                 f"{tuple(before.shape)} by one of shape {tuple(tensor.shape)}; initialize it in "
                                 f"place, or at the shape it was built with")
            before.copy_(tensor.detach())
            table[key] = before
            if versions.get(id(before)) == before._version:  # copy_ moves it; a zero-size copy need not
                versions[id(before)] = before._version - 1


def _pretrained_class() -> type | None:
    """Hugging Face's ``PreTrainedModel`` if transformers is imported (a model of it exists only then)."""
    return getattr(sys.modules.get("transformers"), "PreTrainedModel", None)


def _initializers(module: nn.Module, parents: dict[int, nn.Module]) -> list[Callable[[], object]]:
    """How ``module``'s tensors are initialized after the replay and the Hugging Face pass, in order, each tried for
    the tensors still unwritten: ``module.reset_parameters``, then the ``_init_weights(module)`` of the nearest
    enclosing module that has one, unless that is a Hugging Face model (whose pass ran)."""
    hugging_face = _pretrained_class()
    other: list[Callable[[], object]] = []
    parent = parents.get(id(module))
    while parent is not None and not other:
        if hugging_face is not None and isinstance(parent, hugging_face):
            break
        init_weights = getattr(parent, "_init_weights", None)
        if callable(init_weights):
            other.append(lambda init_weights=init_weights: init_weights(module))
        parent = parents.get(id(parent))
    reset = getattr(module, "reset_parameters", None)
    return [*([reset] if callable(reset) else []), *other]


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``tensor``'s shape and dtype (a parameter if it is one, with its attributes)."""
    return _empty_like(tensor, torch.device("meta"))


def _empty_like(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """New storage on ``device`` for ``tensor``: a parameter stays one, with its ``requires_grad``, the attributes a
    project gave it (``param.no_weight_decay = True``, Hugging Face's ``_is_hf_initialized``) and its gradient hooks."""
    value = torch.empty_like(tensor, device=device)
    if isinstance(tensor, nn.Parameter):
        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
    value.__dict__.update(tensor.__dict__)
    for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):  # register_hook's, and after accumulation's
        if getattr(tensor, hooks, None):
            setattr(value, hooks, getattr(tensor, hooks))
    return value
