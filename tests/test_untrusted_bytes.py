"""No pickle on data from another process: a static scan of the package, a Trainer run with torch's pickling
collectives made to raise, and the JSON values (:mod:`lightning_pipe.strategy.plain`) that replaced them."""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_pipe.strategy.plain import decode, encode
from tests.helpers import ROOT, run_ranks

PICKLING_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "scatter_object_list", "gather_object",
                        "send_object_list", "recv_object_list")
UNPICKLERS = {("pickle", "loads"), ("pickle", "load"), ("pickle", "Unpickler"), ("torch", "load"),
              ("cloudpickle", "loads"), ("dill", "loads")}
# Known and owned elsewhere, each with its reason; the scan fails on anything new.
ALLOWED = {
    # The local test launcher: its children are processes it forked itself, whose results come through a
    # multiprocessing queue (which pickles anyway); nothing from the job's network.
    ("engine/launch.py", "torch.load"),
    # Checkpoint files read from disk, as Lightning's own loading does: a checkpoint is trusted like code (load only
    # your own); nothing another process sends at run time.
    ("strategy/sharded.py", "torch.load"),
    ("checkpoint/convert.py", "torch.load"),
}


def _uses(path: Path) -> set[str]:
    """The pickling collectives and unpicklers that ``path`` calls or imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            if node.attr in PICKLING_COLLECTIVES:
                found.add(node.attr)
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in UNPICKLERS:
                found.add(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cloudpickle", "dill",
                                                                  "torch.distributed"):
            found.update(alias.name for alias in node.names
                         if alias.name in PICKLING_COLLECTIVES or node.module != "torch.distributed")
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in ("pickle", "cloudpickle", "dill"))
    return found


def test_the_package_calls_no_pickling_collective_or_unpickler(tmp_path: Path) -> None:
    package = ROOT / "lightning_pipe"
    found = {(str(path.relative_to(package)), use) for path in package.rglob("*.py") for use in _uses(path)}
    assert found - ALLOWED == set(), f"pickle of data from another process (see tests/test_untrusted_bytes.py): " \
                                     f"{sorted(found - ALLOWED)}"
    # the scan itself finds what it looks for
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle\nimport torch.distributed as dist\n"
                      "dist.all_gather_object([], 1)\nx = pickle.loads(b'')\nfrom torch.distributed import "
                      "broadcast_object_list\n")
    assert _uses(sample) == {"pickle", "all_gather_object", "pickle.loads", "broadcast_object_list"}


@pytest.mark.parametrize("value", [None, True, 3, -2.5, "text", [1, "a"], (1, (2, 3)), {"a": [1, 2]},
                                   {1: "one", (2, 3): "pair"}, Path("/tmp/x.ckpt"), {"__tuple__": 1},
                                   {"lr": [0.1, float("inf")], "loss": [float("nan")]}])
def test_plain_values_come_back_as_they_left(value: Any) -> None:
    back = decode(encode(value))
    if isinstance(value, dict) and "loss" in value:
        assert back["lr"] == value["lr"] and math.isnan(back["loss"][0])
    else:
        assert back == value and type(back) is type(value)


def test_tensors_come_back_as_they_left_without_pickle() -> None:
    """DDP's broadcast takes tensors (pickled): here their bytes, dtype and shape travel in the JSON."""
    for tensor in (torch.tensor([3.0]), torch.arange(6).view(2, 3), torch.ones(2, dtype=torch.bfloat16),
                   torch.tensor(2.5), torch.zeros(0, 4), torch.tensor([True, False]), torch.tensor([1 + 2j]),
                   torch.arange(6.0).view(2, 3)[:1, 1], torch.ones(1).expand(3)):  # a one-element column, expanded
        back = decode(encode({"value": (tensor, 1)}))["value"][0]
        assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor), tensor
    conjugate = torch.tensor([1 + 2j]).conj()  # a conjugate bit: its values travel
    assert torch.equal(decode(encode(conjugate)), torch.tensor([1 - 2j]))
    with pytest.raises(TypeError, match="never pickled"):  # its scale and zero point would not travel
        encode(torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8))
    with pytest.raises(ValueError, match="dtype 'load'"):  # a dtype name is looked up in torch, nothing else
        decode('{"__tensor__": ["load", [1], "cpu", "AA=="]}')


def test_other_values_are_refused_naming_where_they_are() -> None:
    with pytest.raises(TypeError, match=r"value\['plan'\]\[1\] is a torch.Tensor .*meta"):  # no data: refused
        encode({"plan": [1, torch.zeros(2, device="meta")]})
    with pytest.raises(TypeError, match=r"is a builtins.set"):
        encode({1, 2})


def _fit_without_pickle(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import lightning as L
    import torch.distributed as dist

    import lightning_pipe  # noqa: F401
    from lightning_pipe import PipelineStrategy
    from tests.lightning_models import TiedLM, token_data

    def refuse(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"torch.distributed.{name} (pickles what it receives) was called")
        return call

    for name in PICKLING_COLLECTIVES:
        setattr(dist, name, refuse(name))
    seen = {}
    strategy = PipelineStrategy(partition="profile", profile_cache=False)  # a planned cut: broadcast from rank 0
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        max_steps=2, default_root_dir=root)
    trainer.fit(TiedLM(), token_data(2))  # tied embedding and head: their optimizers are compared across ranks
    seen["partition"] = strategy.cut_plan.partition
    seen["broadcast"] = strategy.broadcast({"path": Path(root), "rank": rank, "pair": (1, 2)}, src=1)
    seen["tensor"] = strategy.broadcast(torch.tensor([rank + 3.0]), src=1).tolist()  # as DDP's takes one
    try:
        strategy.broadcast({"bad": object()} if rank == 1 else None, src=1)
    except TypeError as error:
        seen["refused"] = str(error)
    # the full checkpoint format gathers every rank's share on rank 0 without pickle; a state that is not plain data
    # is refused on every rank
    path = os.path.join(root, "full.ckpt")
    trainer.save_checkpoint(path)
    seen["saved"] = sorted(torch.load(path, weights_only=False)["state_dict"]) if rank == 0 else None

    class ObjectState(L.Callback):
        def state_dict(self) -> dict[str, Any]:
            return {"object": object()} if rank == 1 else {}

    trainer.callbacks.append(ObjectState())
    try:
        trainer.save_checkpoint(os.path.join(root, "bad.ckpt"))
    except TypeError as error:
        seen["bad checkpoint"] = str(error)
    seen["expected"] = sorted(TiedLM().state_dict())
    return seen


@pytest.mark.timeout(120)
def test_a_trainer_run_needs_no_pickling_collective(tmp_path: Path) -> None:
    results = run_ranks(_fit_without_pickle, 2, str(tmp_path), timeout=100)
    assert results[0]["partition"] == results[1]["partition"]
    for result in results:
        assert result["broadcast"] == {"path": tmp_path, "rank": 1, "pair": (1, 2)}
        assert result["tensor"] == [4.0]
        assert "broadcast from rank 1: value['bad'] is a builtins.object" in result["refused"]
        assert "pipeline rank 1: this rank's share of the checkpoint" in result["bad checkpoint"]
        assert "holds a object" in result["bad checkpoint"]
    assert results[0]["saved"] == results[0]["expected"]
    assert not (tmp_path / "bad.ckpt").exists()


class Normalizer:
    """A library's object kept in a checkpoint's extras (pytorch-forecasting's dataset parameters hold such)."""

    def __init__(self, scale: float) -> None:
        import numpy as np

        self.scale = scale
        # a fitted scaler's feature_names_in_: its bytes are its items' addresses (said to differ: found by review)
        held = [str(index) * torch.distributed.get_rank() for index in range(50)]  # (each rank's heap its own)
        self.names = np.array([f"x{index}" for index in (1, 2)], dtype=object)
        del held


def _extras_objects(rank: int, world_size: int, root: str, differ: bool = False) -> dict[str, Any]:
    import warnings

    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import TiedLM, token_data

    class WithDataset(TiedLM):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            scale = 2.0 + (torch.distributed.get_rank() if differ else 0)  # (made alike on every rank, or not)
            checkpoint["dataset_parameters"] = {"target_normalizer": Normalizer(scale), "lags": [1, 2]}

    trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        max_steps=2, default_root_dir=root)
    trainer.fit(WithDataset(), token_data(2))
    path = os.path.join(root, "extras.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.save_checkpoint(path)
    if rank != 0:
        return {}
    saved = torch.load(path, weights_only=False)
    own = saved["pipeline"]["own"]
    return {"top": saved["dataset_parameters"]["target_normalizer"].scale,
            "own": [part["dataset_parameters"]["target_normalizer"].scale for part in own],
            "lags": [part["dataset_parameters"]["lags"] for part in own],
            "warned": [str(w.message) for w in caught if "cannot travel between ranks" in str(w.message)]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("differ", [False, True])
def test_extras_that_cannot_travel_are_saved_as_rank_zeros(tmp_path: Path, differ: bool) -> None:
    """pytorch-forecasting's models keep their dataset's normalizers in on_save_checkpoint's extras: every
    checkpoint failed under the pipeline (found by review), on rank 0's own share, which never travels. The other
    ranks' such values go as marks, rank 0's stand in for them, and what can travel still does; said where they
    differ from rank 0's (found by review: said at every save, though made alike on every rank)."""
    saved = run_ranks(_extras_objects, 2, str(tmp_path), differ, timeout=100)[0]
    assert saved["top"] == 2.0 and saved["own"] == [2.0, 2.0] and saved["lags"] == [[1, 2], [1, 2]], saved
    if not differ:
        assert saved["warned"] == []
        return
    assert len(saved["warned"]) == 1 and "rank 1's checkpoint entry ['dataset_parameters']['target_normalizer']" \
        in saved["warned"][0], saved["warned"]


class _Frame:
    """A pandas DataFrame as the digest meets one: internals it cannot read (here a lock), its content by to_dict."""

    __module__ = "pandas.core.frame"

    def __init__(self, scale: float) -> None:
        import threading

        self._mgr, self.scale = threading.Lock(), scale

    def to_dict(self) -> dict[str, list[float]]:
        return {"center": [0.0, self.scale]}


def test_a_pandas_frame_in_the_checkpoints_extras_is_digested_by_its_content() -> None:
    """pytorch-forecasting's GroupNormalizer holds a DataFrame: unreadable, so every save said it differed from rank
    0's (found by review)."""
    from lightning_pipe.strategy.untravelled import _digest

    assert _digest(_Frame(1.0)) is not None and _digest(_Frame(1.0)) == _digest(_Frame(1.0))
    assert _digest(_Frame(1.0)) != _digest(_Frame(2.0))
