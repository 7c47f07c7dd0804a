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

def _register() -> None:
    # The strategy module registers the names when it finishes importing. If it is being imported right now
    # (it imports Lightning, which is how this hook fired), it will do so itself when it is done.
    if "lightning_pipe.strategy.pipeline" not in sys.modules:
        import lightning_pipe.strategy.pipeline  # noqa: F401


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets ``lightning.pytorch`` import as usual, then registers the strategy names."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            self._loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register()


if "lightning.pytorch" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str) -> Any:
    if name == "PipelineStrategy":
        from lightning_pipe.strategy import PipelineStrategy

        return PipelineStrategy
    raise AttributeError(f"module 'lightning_pipe' has no attribute {name!r}")
