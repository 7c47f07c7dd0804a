"""Layers in several ``nn.Sequential`` attributes that the step calls one after the other: one pipeline.

Lightning's own autoencoder keeps an ``encoder`` and a ``decoder`` and its ``training_step`` calls them in turn
(``z = self.encoder(x); x_hat = self.decoder(z)``); its ``forward`` gives the embedding only. When every trainable
parameter lies in such attributes, each an ``nn.Sequential``, the strategy pipelines their layers as one sequence, in
the order the attributes were assigned, and puts a stand-in (:class:`ChainLink`) at each attribute: the first stage
stops the step at the first link's input; the last runs the step with the first links giving a :class:`Handover`
(a tensor that refuses every use: the value lives on other stages) and the last link the pipeline's output. A step
whose links are not called once each, in that order, each on the one before's output, is an error on every rank that
says so.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.deferred import DeferredCalls
from lightning_pipe.strategy.model_calls import ModelCalls, Stop, refuse_other_weights
from lightning_pipe.strategy.references import LayerElsewhere, meta_skeleton, redirect
from lightning_pipe.strategy.split import PipelinedSequence, SplitModule, whole_sequences
from lightning_pipe.strategy.state_names import parameter_keys, tied_names

__all__ = ["chain_paths", "ChainLink", "ChainSplit", "Handover"]


def chain_paths(module: nn.Module) -> list[str] | None:
    """The attributes whose layers form a chain, in assignment order: two or more ``nn.Sequential`` children that
    together hold every trainable parameter (each some); ``None`` when the module is not laid out so."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    holders = [(name, child) for name, child in module.named_children()
               if any(id(p) in trainable for p in child.parameters())]
    if len(holders) < 2 or not all(isinstance(child, nn.Sequential) for _, child in holders):
        return None
    if trainable - {id(p) for _, child in holders for p in child.parameters()}:
        return None
    return [name for name, _ in holders]


class Handover(torch.Tensor):
    """What a link before the last gives the step on the last stage: its output lives on another stage."""

    _link: str

    @staticmethod
    def __new__(cls, link: str) -> Handover:
        handover = torch.Tensor._make_subclass(cls, torch.empty(0))
        handover._link = link
        return handover

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        links = [a._link for a in (*args, *(kwargs or {}).values()) if isinstance(a, Handover)]
        raise RuntimeError(f"the step uses the output of {links[0] if links else 'a link'!r} other than by passing it "
                           f"to the next nn.Sequential of the chain; under PipelineStrategy that value lives on "
                           f"another stage. Call the layers one after the other, or put them in one model the step "
                           f"calls once (self.model = ...)")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Handover({self._link})"


class _Used(Exception):
    """The step used what a link gave it, while :meth:`ChainSplit.links_called` looked (see :class:`_Given`)."""


class _Given(Handover):
    """What a link gives the step while :meth:`ChainSplit.links_called` looks: its use ends the look."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        raise _Used()


class ChainLink(PipelinedSequence):
    """Stands in for one ``nn.Sequential`` of a chain (this rank's layers of it, under their own names)."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], path: str, index: int, count: int,
                 names: Sequence[str] = ()) -> None:
        super().__init__(layers, path, names)
        self._index, self._count = index, count
        self._mode: str | None = None  # "output" while the last stage runs a step
        self._output: Any = None
        self._calls = 0
        self._previous: Handover | None = None  # the last stage: what the link before handed over
        self._step = ""  # the step the last stage runs, in "output" mode
        self._ends = count  # in "output" mode: the links the step calls (an autoencoder's test: the encoder only)
        self._apart = False  # in "look" mode: called on something other than the link before's output
        self.trains = False  # whether some layer of the link (on any rank) has a parameter that requires grad
        self.chain: list[str] = [path]  # every link's path, in the chain's order (ChainSplit.install)
        self.first_calls: ModelCalls | None = None  # the first link's calls (capturing: the step runs to the model)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_output=None, _mode=None, _previous=None, first_calls=None)
        return state

    def forward(self, *inputs: Any) -> Any:
        refuse_other_weights(self, f"the nn.Sequential at {self._path!r}")
        if self.model_calls.mode == "capture" and self._index == 0:  # once per step: stop at the first call
            if self.trains and not torch.is_grad_enabled() and self.model_calls.key.startswith("training_step/"):
                raise RuntimeError(_frozen_advice(self._path))
            self.model_calls.record(inputs[0] if len(inputs) == 1 else inputs)
            raise Stop()
        if self._index > 0 and self.first_calls is not None and self.first_calls.mode == "capture":
            first = self.chain[0]
            frozen = self._path if not torch.is_grad_enabled() else first
            raise RuntimeError(f"the step calls the nn.Sequential at {self._path!r} before {first!r}: the pipeline "
                               f"takes the nn.Sequential attributes that hold trainable parameters "
                               f"({', '.join(map(repr, self.chain))}) for one model's layers, chained in the order "
                               f"they were assigned, each link taking the one before's output. If {frozen!r} is a "
                               f"model the step only uses (a distillation teacher called under torch.no_grad(), left "
                               f"out of the optimizer), freeze it: self.{frozen}.requires_grad_(False) in __init__ "
                               f"or setup(), and it stays whole on every rank; else assign them in the order the step "
                               f"calls them, or put them in one model the step calls")
        if self._mode == "look":  # :meth:`ChainSplit.links_called`
            self._calls += 1
            self._apart = self._apart or (self._index > 0 and not (len(inputs) == 1 and inputs[0] is self._previous))
            return self._output
        if self._mode == "output" and self._index >= self._ends:
            raise RuntimeError(f"the step calls the nn.Sequential at {self._path!r} in {self._step} on this batch, "
                               f"though on its first batch it used the output of the link before it (the chain's "
                               f"links it calls are found on a step's first batch, and only those run)")
        if self._mode == "output":
            self._calls += 1
            if self._step == "training_step" and self.trains and not torch.is_grad_enabled():
                raise RuntimeError(_frozen_advice(self._path))
            if self._calls > 1:
                raise RuntimeError(f"the step calls the nn.Sequential at {self._path!r} more than once; a pipeline "
                                   f"runs each link of a chain once per step. For a chain called once per view (an "
                                   f"encoder then a predictor, BYOL's or SimSiam's two views), make it one model "
                                   f"called once per view: self.model = nn.Sequential(*self.encoder, "
                                   f"*self.predictor) (or a module returning both outputs), with the calls made "
                                   f"before their outputs are used (p1, p2 = self.model(v1), self.model(v2))")
            if self._index > 0 and not (len(inputs) == 1 and inputs[0] is self._previous):
                raise RuntimeError(f"the step calls {self._path!r} on something other than the output of the "
                                   f"nn.Sequential before it in the chain; PipelineStrategy pipelines the chain "
                                   f"{self._path!r} belongs to only when each link takes the one before's output, "
                                   f"once. Where the step calls it on other inputs too (a GAN's discriminator on the "
                                   f"real batch and on generated samples), these are not one model: pipeline one of "
                                   f"them alone, PipelineStrategy(layers={self._path!r}) (the rest stays whole on "
                                   f"every rank and must not compute its input with gradients), or train the pair on "
                                   f"one device or with DDP")
            return self._output
        return super().forward(*inputs)


def _frozen_advice(path: str) -> str:
    return (f"the step calls the nn.Sequential at {path!r} under torch.no_grad() (a frozen feature extractor, a "
            f"distillation teacher); the pipeline runs the chain's links as one model, with gradients, so it would "
            f"train. Freeze it instead: self.{path}.requires_grad_(False) in __init__ or setup(), which trains as on "
            f"one device (it then stays whole on every rank)")


class ChainSplit(SplitModule):
    """:class:`~.split.SplitModule` for a chain of ``nn.Sequential`` attributes (see the module's doc)."""

    def __init__(self, module: nn.Module, paths: Sequence[str]) -> None:
        self.module = module
        self.paths = list(paths)
        self.parts = [module.get_submodule(path) for path in self.paths]
        # every layer, a repeated one at each of its places (named_children() and children() list it once)
        self.origin = [(index, name) for index, part in enumerate(self.parts) for name in part._modules]
        self.sequence = nn.Sequential(*[layer for part in self.parts for layer in part._modules.values()])
        self.path = "+".join(self.paths)  # in messages
        self.state_keys = list(module.state_dict().keys())
        self.parameter_keys = parameter_keys(module)  # one device's, in its order
        self.tied_names = tied_names(module)  # one device's numbering of optimizer states counts a tie once
        inside = {id(p) for part in self.parts for p in part.parameters()}
        self.outside_trainable = [name for name, p in module.named_parameters()
                                  if p.requires_grad and id(p) not in inside]
        self.proxy = None  # hyper-parameters holding a link are checkpointed as they are, not made whole
        self.skeleton = None
        self.skeletons = [meta_skeleton(part) for part in self.parts]  # for configure_optimizers' whole view
        self.links: list[ChainLink] = []
        self.aliases: list[str] = []
        self.deferred: DeferredCalls | None = None
        self.called: dict[str, int] = {}  # evaluation steps: how many links each calls (:meth:`links_called`)

    @property
    def is_cut(self) -> bool:
        return bool(self.links)

    def install(self, local_layers: Sequence[tuple[str, nn.Module]]) -> ChainLink:  # type: ignore[override]
        """One :class:`ChainLink` per attribute, holding this rank's layers of it; returns the first."""
        by_part: list[list[tuple[str, nn.Module]]] = [[] for _ in self.parts]
        for name, layer in local_layers:
            index, own = self.origin[int(name)]
            by_part[index].append((own, layer))
        for index, (path, part) in enumerate(zip(self.paths, self.parts)):
            link = ChainLink(by_part[index], path, index, len(self.parts), list(part._modules))
            link.trains = any(p.requires_grad for p in part.parameters())
            link.chain = list(self.paths)
            parent_path, _, attribute = path.rpartition(".")
            setattr(self.module.get_submodule(parent_path) if parent_path else self.module, attribute, link)
            self.links.append(link)
        links = self.links
        for link in links[1:]:
            link.first_calls = links[0].model_calls
        # a layer of several attributes (a block shared by the encoder and the decoder) is held where any link holds it
        local = {id(m) for link in links for m in link.modules()}
        for path, part in zip(self.paths, self.parts):
            def inside_to(alias: str, name: str, child: nn.Module, path: str = path) -> nn.Module | None:
                return None if id(child) in local else LayerElsewhere(alias, name, path)

            self.aliases += redirect(self.module, part, links[self.paths.index(path)], path, inside_to)
        device = next(iter(self.sequence.parameters()), torch.empty(0)).device
        self.deferred = DeferredCalls(self.module, lambda child: any(m in links for m in child.modules()), device)
        self.parts, self.sequence = [], None  # type: ignore[assignment]  # the other ranks' layers go
        return links[0]

    @contextmanager
    def whole(self, device: torch.device) -> Iterator[list[nn.Parameter]]:
        """Inside (while ``configure_optimizers`` runs), every link holds every layer of its ``nn.Sequential``, other
        ranks' as placeholders (:func:`~.split.whole_sequences`), so that groups made by name are one device's."""
        parts = [(link, skeleton, f"{link._path}.") for link, skeleton in zip(self.links, self.skeletons)]
        with whole_sequences(parts, self.tied_names, device) as placeholders:
            yield placeholders

    def capture_input(self, step: str, microbatch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        self.proxy = self.links[0]
        try:
            return super().capture_input(step, microbatch, args, kwargs)
        finally:
            self.proxy = None

    def links_called(self, step: str, microbatch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        """How many of the chain's links ``step`` calls, each on the one before's output, before it uses what the
        last of them gives (``test_step`` through an autoencoder's ``forward``: the encoder alone), found by running
        the step on ``microbatch`` with each link giving a stand-in whose use ends the run; every link where the run
        shows anything else (the step's errors are then met in the pipeline's run). The caller keeps the step's
        logs, metrics and changes out of this run. Remembered per step: :meth:`layers_called`."""
        links = self.links
        given = [_Given(link._path) for link in links]
        for index, link in enumerate(links):
            link._mode, link._calls, link._apart = "look", 0, False
            link._output, link._previous = given[index], given[index - 1] if index else None
        try:
            getattr(self.module, step)(microbatch, *args, **kwargs)
        except _Used:
            pass
        except Exception:  # noqa: BLE001 - the step's own error shows in the pipeline's run of it
            self.called[step] = len(links)
            return len(links)
        finally:
            calls = [(link._calls, link._apart) for link in links]
            for link in links:
                link._mode, link._output, link._previous = None, None, None
        ends = next((index for index, (count, _) in enumerate(calls) if count == 0), len(links))
        plain = ends > 0 and all(count == 1 and not apart for count, apart in calls[:ends]) \
            and not any(count for count, _ in calls[ends:])
        self.called[step] = ends if plain else len(links)
        return self.called[step]

    def layers_called(self, step: str) -> int | None:
        """The number of the sequence's layers ``step`` runs, where it calls only the chain's first links
        (:meth:`links_called`); None where it calls every link."""
        ends = self.called.get(step, len(self.links))
        return None if ends == len(self.links) else sum(1 for index, _ in self.origin if index < ends)

    def run_step(self, step: str, output: Any, microbatch: Any, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> Any:
        links = self.links
        ends = self.called.get(step, len(links)) if step != "training_step" else len(links)
        handovers = [Handover(link._path) for link in links[:-1]]
        for index, link in enumerate(links):
            link._mode, link._calls, link._step, link._ends = "output", 0, step, ends
            link._output = output if index == ends - 1 else handovers[index] if index < ends else None
            link._previous = handovers[index - 1] if index else None
        deferring = self.deferred.around(lambda: links[0]._calls > 0) if self.deferred is not None else None
        try:
            if deferring is None:
                result = getattr(self.module, step)(microbatch, *args, **kwargs)
            else:
                with deferring:
                    result = getattr(self.module, step)(microbatch, *args, **kwargs)
            missing = [link._path for link in links[:ends] if link._calls == 0]
            if missing:
                raise RuntimeError(f"{type(self.module).__name__}.{step} never called {missing}; PipelineStrategy "
                                   f"pipelines {self.paths} as one chain, so the step must call each of them once, "
                                   f"in that order")
        finally:
            for link in links:
                link._mode, link._output, link._previous, link._ends = None, None, None, len(links)
        return result

    def _never_called(self, step: str) -> str:
        return (f"{type(self.module).__name__}.{step} never called {self.paths[0]!r}, the first nn.Sequential of the "
                f"chain {self.paths} that PipelineStrategy pipelines; the step must call each of them once, in order")
