"""The package installs whole: every package of the tree is listed, and the top-level configs/ compose from the
editable install and from a built wheel installed into a fresh virtual environment."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.timeout(300)

COMPOSE = """
import sys
import lightning_pipe.configs
from hydra import compose, initialize_config_module
with initialize_config_module(config_module="lightning_pipe.configs", version_base="1.3"):
    cfg = compose(config_name="train", overrides=["strategy=gpipe", "trainer=cpu_sim", "experiment=digits"])
print(lightning_pipe.configs.__file__)
print(cfg.strategy._target_, cfg.strategy.schedule, cfg.trainer.devices, cfg.model._target_)
"""


def test_every_package_of_the_tree_is_listed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "lightning_pipe").rglob("__init__.py")}
    assert listed == found | {"lightning_pipe.configs"}, "list the new package in pyproject.toml [tool.setuptools]"
    assert (ROOT / "configs" / "__init__.py").exists() and not (ROOT / "lightning_pipe" / "configs").exists()


def test_configs_compose_from_the_editable_install() -> None:
    done = subprocess.run([sys.executable, "-c", COMPOSE], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, composed = done.stdout.strip().splitlines()[-2:]
    # the configs/ of the checkout the project was installed from (in CI: this one)
    assert (Path(where).parent / "train.yaml").read_text() == (ROOT / "configs" / "train.yaml").read_text()
    assert composed.split()[:2] == ["lightning_pipe.PipelineStrategy", "gpipe"]


def test_configs_compose_from_a_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it (no dependencies) into a new venv whose only other packages are Hydra's, and
    compose there: the YAML must have travelled inside the wheel."""
    source = tmp_path / "source"  # a copy, so that the build's own folders stay out of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lightning_pipe", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_pipe-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stderr[-2000:]
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    # Hydra and what it needs, taken from this environment by path (no download); nothing of the checkout.
    needs = ["hydra", "omegaconf", "antlr4", "yaml", "packaging"]
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in needs:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        os.symlink(next(iter(spec.submodule_search_locations)), deps / name)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(site), str(deps)])}
    done = subprocess.run([str(fresh / "bin" / "python"), "-c", COMPOSE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    where, composed = done.stdout.strip().splitlines()[-2:]
    assert Path(where).is_relative_to(site)
    assert composed.split() == ["lightning_pipe.PipelineStrategy", "gpipe", "4",
                                "lightning_pipe.demos.digits.DigitsClassifier"]
