"""The engine's pure parts: trees, micro-batches and their loss weights, cutting layers into stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_pipe.engine.microbatch import microbatch_weights, split_batch
from lightning_pipe.engine.cut import balance, cut, stage_sizes
from lightning_pipe.engine.kept import kept_buffers, kept_modes
from lightning_pipe.engine.tree import tree_flatten, tree_unflatten


def test_tree_round_trip() -> None:
    tree = {"a": (torch.ones(1), [torch.zeros(2), "x"]), "b": 3}
    leaves, spec = tree_flatten(tree)
    assert len(leaves) == 2
    rebuilt = tree_unflatten(leaves, spec)
    assert rebuilt["b"] == 3 and rebuilt["a"][1][1] == "x" and torch.equal(rebuilt["a"][1][0], torch.zeros(2))


def test_uneven_split_and_weights() -> None:
    batch = (torch.arange(10.0).unsqueeze(1), {"y": torch.arange(10), "name": "digits"}, torch.tensor(7))
    parts = split_batch(batch, 4)
    assert [len(p[0]) for p in parts] == [3, 3, 2, 2]
    assert all(p[1]["name"] == "digits" and p[2].item() == 7 for p in parts)
    assert torch.equal(torch.cat([p[1]["y"] for p in parts]), torch.arange(10))
    assert microbatch_weights(parts) == pytest.approx([0.3, 0.3, 0.2, 0.2])


def test_weighted_microbatch_losses_equal_batch_mean() -> None:
    x = torch.randn(10, 3)
    parts = split_batch(x, 4)
    weighted = sum(w * p.pow(2).mean() for w, p in zip(microbatch_weights(parts), parts))
    torch.testing.assert_close(weighted, x.pow(2).mean())


def test_fewer_rows_than_microbatches_gives_one_per_row() -> None:
    assert [len(p) for p in split_batch(torch.ones(3, 2), 8)] == [1, 1, 1]


def test_split_errors() -> None:
    with pytest.raises(ValueError, match="same size along dim 0"):
        split_batch((torch.ones(4, 1), torch.ones(3)), 2)
    with pytest.raises(ValueError, match=r"\(batch\['cw'\] \(3,\) beside 8 rows elsewhere\)"):  # named (review)
        split_batch({"x": torch.ones(8, 2), "y": torch.ones(8), "cw": torch.ones(3)}, 2)
    with pytest.raises(ValueError, match="without tensors"):
        split_batch(("a", 1), 2)
    with pytest.raises(ValueError, match="has no rows: give the DataLoader a batch_size"):  # batch_size=None
        split_batch((torch.tensor(1.0), torch.tensor(2)), 1)
    # a batch of graphs as PyTorch Geometric collates it: not a dict of loaders' batches, but graphs to make rows
    graphs = {"x": torch.ones(9, 3), "edge_index": torch.zeros(2, 14, dtype=torch.long),
              "batch": torch.zeros(9, dtype=torch.long), "y": torch.ones(3)}
    with pytest.raises(ValueError, match="a batch of graphs") as error:
        split_batch(graphs, 2)
    assert "CombinedLoader" not in str(error.value)
    assert "One graph per batch" in str(error.value) and "num_microbatches=1" in str(error.value)  # (found by review)
    class DataBatch:  # PyTorch Geometric's loader's batch, its tensors in attributes (found by review: told to make
        # it a dict, which was then refused as a batch of graphs)
        num_graphs = 3

        def __init__(self) -> None:
            self.x, self.edge_index = torch.ones(9, 3), torch.zeros(2, 14, dtype=torch.long)
            self.batch = torch.zeros(9, dtype=torch.long)

    with pytest.raises(ValueError, match=r"cannot split a batch of DataBatch into micro-batches.*a batch of graphs"):
        split_batch(DataBatch(), 2)
    with pytest.raises(ValueError, match="CombinedLoader") as error:  # a dict of loaders' batches, other batch sizes
        split_batch({"a": (torch.ones(4, 1), torch.ones(4)), "b": (torch.ones(3, 1), torch.ones(3))}, 2)
    assert "In validation or testing, where dropped rows change the metric" in str(error.value)  # (found by review)
    # the rows' sequences concatenated beside their start offsets, as nn.EmbeddingBag takes them
    bags = (torch.tensor([1, 0, 2]), torch.arange(11), torch.tensor([0, 4, 4]))
    with pytest.raises(ValueError, match=r"concatenated beside their 3 start offsets \(as nn.EmbeddingBag"):
        split_batch(bags, 2)
    with pytest.raises(ValueError) as error:  # offsets that fall are not offsets
        split_batch((torch.tensor([1, 0, 2]), torch.arange(11), torch.tensor([0, 4, 2])), 2)
    assert "EmbeddingBag" not in str(error.value)
    # a time-major sequence batch ((T, B, F) for batch_first=False layers) beside (B, k) targets (found by review: the
    # advice was to stack or pad the rows)
    with pytest.raises(ValueError, match=r"The \(5, 8, 3\) tensor holds the other tensors' 8 rows along dim 1: "
                                         r"time-major.*x.transpose\(0, 1\)"):
        split_batch((torch.ones(5, 8, 3), torch.ones(8, 4)), 2)
    with pytest.raises(ValueError) as error:
        split_batch((torch.ones(4, 1), torch.ones(3)), 2)
    assert "time-major" not in str(error.value)


def test_stage_sizes() -> None:
    layers = [nn.Linear(4, 4) for _ in range(10)]
    assert stage_sizes(layers, 4) == [3, 3, 2, 2]
    assert stage_sizes(layers, 2, [7, 3]) == [7, 3]
    heavy = [nn.Linear(64, 64)] + [nn.Linear(2, 2) for _ in range(7)]
    assert stage_sizes(heavy, 2, "parameters") == [1, 7]
    # Replicated stages get shares in proportion to their ranks: 3 of 4 ranks hold three quarters of the layers.
    assert stage_sizes(layers[:8], 2, "uniform", replicas=[3, 1]) == [6, 2]
    assert stage_sizes(layers[:6], 2, "uniform", replicas=[3, 1]) == [5, 1]  # 5/3 beats 4/3 with 2 on one rank
    assert stage_sizes(layers[:8], 3, "uniform", replicas=[2, 1, 1]) == [4, 2, 2]
    assert stage_sizes(layers, 4, "uniform", replicas=[1, 1, 1, 1]) == stage_sizes(layers, 4)


@pytest.mark.parametrize("partition,message", [
    ([5, 4], "adds up to 9 layers but the model has 10"),
    ([10, 0], "empty stage"),
    ([3, 3, 4], "gives 3 stages but the pipeline has 2"),
    ("zigzag", "unknown partition 'zigzag'"),
])
def test_bad_partitions(partition, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stage_sizes([nn.Identity()] * 10, 2, partition)


def test_more_stages_than_layers() -> None:
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4 stages"):
        stage_sizes([nn.Identity()] * 3, 4)


def test_balance_is_optimal_against_brute_force() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(1, 9), rng.randint(1, 4)
        if k > n:
            continue
        weights = [rng.randint(0, 20) for _ in range(n)]
        best = min(max(sum(weights[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
                   for cuts in itertools.combinations(range(1, n), k - 1))
        sizes = balance(weights, k)
        assert sum(sizes) == n and min(sizes) >= 1
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
        assert max(sum(weights[bounds[i]:bounds[i + 1]]) for i in range(k)) == best


def test_cut_keeps_layer_names() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    stages = cut(model, [2, 1])
    assert list(stages[1].state_dict()) == ["2.weight", "2.bias"]
    assert stages[0][0] is model[0]


def test_the_engine_imports_without_lightning() -> None:
    """A plain script using the engine pays nothing for Lightning (seconds and ~180 MB per rank)."""
    import subprocess
    import sys

    code = ("import sys, lightning_pipe.engine.executor; assert 'lightning' not in sys.modules, 'engine pulled in Lightning'; "
            "import lightning.pytorch as pl; assert 'pipedream' in pl.strategies.StrategyRegistry, 'names not registered'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # Every order of imports registers the names (the strategy module itself imports Lightning first).
    for code in ("from lightning_pipe import PipelineStrategy; import lightning.pytorch as pl",
                 "import lightning.pytorch as pl, lightning_pipe"):
        subprocess.run([sys.executable, "-c", code + "; assert 'pipedream_2bw' in pl.strategies.StrategyRegistry"],
                       check=True, timeout=120)


def test_a_pytorch_lightning_trainer_is_told_to_use_the_lightning_package() -> None:
    """The standalone ``pytorch_lightning`` package's Trainer takes only its own strategies: it answered the names with
    its "invalid strategy name" (found by review); in either order of imports it now says what to change. The names
    are the ones registered with ``lightning.pytorch``."""
    import subprocess
    import sys

    import lightning.pytorch as lightning_pytorch

    import lightning_pipe

    registered = {name for name, entry in lightning_pytorch.strategies.StrategyRegistry.items()
                  if getattr(entry["strategy"], "__module__", "").startswith("lightning_pipe")}
    assert registered == set(lightning_pipe.STRATEGY_NAMES)
    for imports in ("import pytorch_lightning as pl, lightning_pipe", "import lightning_pipe, pytorch_lightning as pl",
                    # a library probing for it first (the spec alone) leaves it watched
                    "import importlib.util, lightning_pipe; importlib.util.find_spec('pytorch_lightning')\n"
                    "import pytorch_lightning as pl"):
        code = f"{imports}\npl.Trainer(strategy='gpipe', accelerator='cpu', devices=1, logger=False)"
        done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
        assert done.returncode != 0 and "Change the project's imports from `pytorch_lightning` to `lightning.pytorch`" \
            in done.stderr, done.stderr[-2000:]


def test_a_library_making_a_pytorch_lightning_trainer_is_named(tmp_path: Any) -> None:
    """neuralforecast and darts make a ``pytorch_lightning`` Trainer themselves from the strategy the user passes:
    "change the project's imports" was advice their users cannot follow (found by review). The library is named, and
    what it means said."""
    import subprocess
    import sys

    library = tmp_path / "site-packages" / "forecastlib"
    library.mkdir(parents=True)
    (library / "__init__.py").write_text(
        "def fit(**trainer_kwargs):\n    import pytorch_lightning as pl\n"
        "    pl.Trainer(accelerator='cpu', devices=1, logger=False, **trainer_kwargs)\n")
    code = (f"import sys; sys.path.insert(0, {str(library.parent)!r})\nimport lightning_pipe, forecastlib\n"
            f"forecastlib.fit(strategy='pipedream')")
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode != 0 and "It was made by the library 'forecastlib'" in done.stderr, done.stderr[-2000:]
    assert "cannot be pipelined" in done.stderr and "Change the project's imports" not in done.stderr
    # a package that builds objects from a configuration (Hydra's instantiate) is not the maker: its caller is
    builder = tmp_path / "site-packages" / "fiddle"
    builder.mkdir()
    (builder / "__init__.py").write_text("def build(make, **kwargs):\n    return make(**kwargs)\n")
    code = (f"import sys; sys.path.insert(0, {str(builder.parent)!r})\nimport lightning_pipe, fiddle\n"
            f"import pytorch_lightning as pl\nfiddle.build(pl.Trainer, strategy='pipedream', accelerator='cpu', "
            f"devices=1, logger=False)")
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode != 0 and "Change the project's imports" in done.stderr, done.stderr[-2000:]


def test_a_look_at_a_module_leaves_its_buffers_and_modes_as_it_found_them_even_when_the_run_replaced_one():
    norm = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), norm).train()
    mean, count = norm.running_mean, norm.num_batches_tracked
    with kept_modes([model]), kept_buffers([model]):
        model.eval()
        model.train()(torch.randn(4, 3))  # changes the statistics in place
        norm.running_mean = torch.full((3,), 7.0)  # and replaces one, as .to(another device) does
        model.eval()
    assert norm.running_mean is mean and torch.equal(mean, torch.zeros(3))
    assert norm.num_batches_tracked is count and int(count) == 0
    assert model.training and norm.training
    untouched = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()  # a frozen teacher's: run, not changed
    versions = [buffer._version for buffer in untouched.buffers()]
    with kept_buffers([untouched]):
        untouched(torch.randn(4, 3))
    assert [buffer._version for buffer in untouched.buffers()] == versions  # nothing to tell a step it changed them


def test_the_count_a_loss_is_a_mean_over_is_read_from_its_graph() -> None:
    """Cross entropy's labels not ignored, a .mean()'s elements, a mask's sum a sum is divided by, through a scaling
    by a constant; no count for a sum of terms or an MSE."""
    import torch.nn.functional as F

    from lightning_pipe.strategy.loss_graph import mean_count

    x = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([1, -100, 2, -100, 3, 4])
    kept = (labels != -100).float()
    assert mean_count(F.cross_entropy(x, labels, ignore_index=-100)) == 4.0
    assert mean_count(0.5 * F.cross_entropy(x, labels.clamp(min=0))) == 6.0
    assert mean_count((x.sum(1) * kept).sum() / kept.sum()) == 4.0 and mean_count(x.sum(1)[kept > 0].mean()) == 4.0
    assert mean_count(x.mean() + x.sum()) is None and mean_count(F.mse_loss(x, torch.zeros(6, 5))) is None
    assert mean_count(torch.tensor(1.0)) is None
