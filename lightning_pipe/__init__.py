"""Pipeline-parallel training for PyTorch Lightning; importing it registers its strategy names with Lightning.

Lightning itself is imported only when it is used: the engine (``lightning_pipe.engine``) runs from plain
scripts, and importing Lightning costs a rank seconds and ~180 MB. So the names ``pipedream``, ``gpipe``, ... are
registered right away if Lightning is already imported, and otherwise the moment ``lightning.pytorch`` finishes
importing (an import hook watches for it), always before a ``Trainer`` can look them up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

__all__ = ["PipelineStrategy"]

STRATEGY_NAMES = ("pipedream", "gpipe", "pipedream_async", "pipedream_2bw")
"""The names registered with ``lightning.pytorch``'s Trainer (:meth:`.PipelineStrategy.register_strategies`)."""


def _register() -> None:
    # The strategy module registers the names when it finishes importing. If it is being imported right now
    # (it imports Lightning, which is how this hook fired), it will do so itself when it is done.
    if "lightning_pipe.strategy.pipeline" not in sys.modules:
        import lightning_pipe.strategy.pipeline  # noqa: F401


class _OtherLightning:
    """What ``pytorch_lightning``'s Trainer gets for the strategy names: the standalone ``pytorch_lightning`` package is
    a copy of Lightning whose Trainer takes only its own strategies, so the names are registered there too, to say
    what to change instead of Lightning's "invalid strategy name"."""

    def __init__(self, **_: Any) -> None:
        maker = _trainers_maker()
        said = ("lightning_pipe's strategies are made for the `lightning` package's Trainer (import lightning as L; "
                "from lightning.pytorch import LightningModule, Trainer), and this Trainer is the standalone "
                "`pytorch_lightning` package's, a separate copy of Lightning that takes only its own strategies. ")
        if maker is not None and "-packages" in maker[1]:  # a library made it (neuralforecast's, darts' models)
            raise ImportError(f"{said}It was made by the library {maker[0].partition('.')[0]!r} ({maker[1]}:"
                              f"{maker[2]}), which is built on `pytorch_lightning`: its models are that package's "
                              f"LightningModules, which the `lightning` package's Trainer refuses too, so they cannot "
                              f"be pipelined. Train them with the library's own strategies (one device, 'ddp')")
        raise ImportError(f"{said}Change the project's imports from `pytorch_lightning` to `lightning.pytorch` (the "
                          f"same API; `pip install lightning`)")


# packages that build objects from a configuration (Hydra's instantiate): the Trainer's maker is who called them
_BUILDERS = ("hydra", "omegaconf", "jsonargparse", "fiddle", "gin", "importlib", "functools")


def _trainers_maker() -> tuple[str, str, int] | None:
    """The module, file and line of the code that made the Trainer now being made: the innermost caller outside
    ``pytorch_lightning`` and this package."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("pytorch_lightning", "lightning_fabric", "lightning_pipe", *_BUILDERS)):
            return module, frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _refuse_in_pytorch_lightning() -> None:
    """A courtesy, run inside ``import pytorch_lightning``: nothing here may break that import (a version from before
    its strategy registry, 1.5 and older, has nothing to register with)."""
    try:
        from pytorch_lightning.strategies import StrategyRegistry

        for name in STRATEGY_NAMES:
            if name not in StrategyRegistry:
                StrategyRegistry.register(name, _OtherLightning,
                                          description="lightning_pipe: use the lightning package")
    except Exception:  # noqa: BLE001
        return


_WATCHED = {"lightning.pytorch": _register, "pytorch_lightning": _refuse_in_pytorch_lightning}


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets ``lightning.pytorch`` (or ``pytorch_lightning``) import as usual, then registers the strategy names."""

    def __init__(self) -> None:
        self._loaders: dict[str, Any] = {}

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        # (a probe of the spec alone, importlib.util.find_spec, leaves the module to import later: watched again)
        if name not in _WATCHED or name in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            self._loaders[name] = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loaders[module.__spec__.name].exec_module(module)
        _WATCHED[module.__spec__.name]()


for _name, _then in _WATCHED.items():
    if _name in sys.modules:
        _then()
if not all(name in sys.modules for name in _WATCHED) \
        and not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str) -> Any:
    if name == "PipelineStrategy":
        from lightning_pipe.strategy import PipelineStrategy

        return PipelineStrategy
    raise AttributeError(f"module 'lightning_pipe' has no attribute {name!r}")
