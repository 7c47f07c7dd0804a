"""Each stage's layers draw from seeds of their own: different masks on different stages, micro-batches and steps,
reproducible from a seed and stateless (a step given its seed draws the same masks whatever ran before: exact resume),
replayed by re-materialization, invisible to the process's generator."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.rng import forked, forward_seed, step_seed
from lightning_pipe.engine.stage import PipelineStage
from tests.helpers import run_ranks
from tests.models import make_batch, mse_loss

WIDTH = 16


class DropoutProbe(nn.Module):
    """A Linear whose output goes through a dropout mask drawn on a tensor of ones, so every stage draws from the same
    input; keeps every mask it drew (a recomputation draws again)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)
        self.masks: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = F.dropout(torch.ones_like(x), 0.5, self.training) > 0
        self.masks.append(mask)
        return self.linear(x) * mask


def _two_stages(seed: int) -> list[PipelineStage]:
    """Two stages holding identical dropout layers."""
    torch.manual_seed(0)
    layer = DropoutProbe()
    return [PipelineStage(copy.deepcopy(layer), index, 2, seed=seed) for index in range(2)]


def _forwards(stages: list[PipelineStage], microbatches: int = 2) -> list[list[torch.Tensor]]:
    """Identical inputs through both stages; their masks: [stage][micro-batch]."""
    x = torch.ones(8, WIDTH)
    for mb in range(microbatches):
        for stage in stages:
            stage.forward(mb, x.clone().requires_grad_())
    return [stage.module.masks for stage in stages]


def _stage_masks(seed: int) -> list[list[torch.Tensor]]:
    return _forwards(_two_stages(seed))


def test_stages_with_identical_dropout_and_inputs_draw_different_masks_reproducibly() -> None:
    (first, second), again, other_seed = _stage_masks(7), _stage_masks(7), _stage_masks(8)
    for mb in range(2):
        assert not torch.equal(first[mb], second[mb]), "two stages drew the same mask"
    assert not torch.equal(first[0], first[1]), "the stream did not continue from one micro-batch to the next"
    for mine, theirs in zip(first + second, again[0] + again[1]):
        assert torch.equal(mine, theirs), "the same seed did not give the same masks"
    assert not torch.equal(first[0], other_seed[0][0])


def test_the_process_generator_does_not_see_the_layers_draws() -> None:
    """What runs around the stages (the step code on the first and last stage) draws the same numbers however many
    the layers drew."""
    stages = _two_stages(7)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    _forwards(stages, microbatches=3)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_rematerialization_replays_the_stage_stream() -> None:
    torch.manual_seed(0)
    layers = nn.Sequential(DropoutProbe(), nn.Tanh(), DropoutProbe())
    grads = []
    for remat in (False, True):
        module = copy.deepcopy(layers)
        stage = PipelineStage(module, 1, 3, checkpoint_activations=remat, seed=11)
        for step in range(2):
            for mb in range(2):
                stage.forward(mb, torch.ones(4, WIDTH, requires_grad=True))
            for mb in range(2):
                stage.backward(mb, [torch.ones(4, WIDTH)])
        grads.append([p.grad.clone() for p in module.parameters()])
        masks = module[0].masks
        if remat:  # each forward's mask drawn again, identically, by its recomputation
            assert len(masks) == 8 and all(torch.equal(masks[i], masks[i + 2]) for i in (0, 1, 4, 5))
            assert not torch.equal(masks[0], masks[4]), "the stream did not continue from one step to the next"
    for plain, remat in zip(*grads):
        torch.testing.assert_close(remat, plain, rtol=0, atol=0)


def test_forward_seeds_are_distinct_and_a_forward_needs_no_state() -> None:
    seeds = {forward_seed(step, stage, mb) for step in range(50) for stage in range(8) for mb in range(8)}
    assert len(seeds) == 50 * 8 * 8 and all(0 <= s < 2**63 for s in seeds)
    assert len({step_seed(base, step) for base in range(20) for step in range(20)}) == 400
    with forked(forward_seed(3, 1, 2)):
        expected = torch.rand(3)
    torch.rand(100)  # whatever ran before, the same seed draws the same numbers
    with forked(forward_seed(3, 1, 2)):
        torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stages_draw_their_own_masks_and_leave_the_device_generator_alone() -> None:
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    layer = DropoutProbe().to(device)
    stages = [PipelineStage(copy.deepcopy(layer), index, 2, device=device, checkpoint_activations=True, seed=7)
              for index in range(2)]
    before = torch.cuda.get_rng_state(device)
    x = torch.ones(8, WIDTH, device=device)
    for stage in stages:
        stage.forward(0, x.clone().requires_grad_())
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    for stage in stages:
        stage.backward(0, [torch.ones(8, WIDTH, device=device)])
    assert torch.equal(torch.cuda.get_rng_state(device), before)
    (first, replayed), (second, _) = (stage.module.masks for stage in stages)
    assert not torch.equal(first, second), "two stages drew the same mask"
    assert torch.equal(first, replayed), "the recomputation drew another mask"


def _pipeline_masks(rank: int, world_size: int, cases: list) -> dict:
    """Per case: this rank's masks per stage, its gradients, whether the process generator moved, its base seed."""
    results = {}
    for schedule, remat, seed in cases:
        torch.manual_seed(100 + rank)  # ranks seeded differently: the base seed must still be rank 0's
        model = nn.Sequential(*[DropoutProbe() for _ in range(4)])
        torch.manual_seed(100 + rank if seed is None else 5)
        pipe = Pipeline(copy.deepcopy(model), loss_fn=mse_loss, schedule=schedule, num_microbatches=4,
                        checkpoint_activations=remat, seed=seed)
        before = torch.get_rng_state()
        for step in range(2):
            pipe.train_step(make_batch(8, seed=step))
        moved = not torch.equal(before, torch.get_rng_state())
        masks = {index: torch.stack(stage.module[0].masks) for index, stage in pipe.stages.items()}
        grads = {name: p.grad.clone() for name, p in pipe.named_parameters()}
        results[(schedule, remat, seed)] = {"masks": masks, "grads": grads, "moved": moved, "seed": pipe.seed}
    # Stateless: a step given its seed draws the same masks in a fresh pipeline as after other steps (exact resume).
    resumed = []
    for seeds in ([21, 22], [22]):
        pipe = Pipeline(copy.deepcopy(model), loss_fn=mse_loss, schedule="1f1b", num_microbatches=4)
        for step_seed_ in seeds:
            pipe.train_step(make_batch(8, seed=step_seed_), seed=step_seed_)
        resumed.append({index: torch.stack(stage.module[0].masks[-4:]) for index, stage in pipe.stages.items()})
    results["resumed"] = resumed
    return results


@pytest.mark.timeout(300)
def test_pipeline_stages_draw_their_own_masks() -> None:
    """2 ranks: 4 identical dropout stages (interleaved: two per rank) or 2 (1f1b: two identical layers per stage)."""
    plain, remat, one_f_one_b, unseeded = cases = [("interleaved_1f1b", False, 5), ("interleaved_1f1b", True, 5),
                                                   ("1f1b", False, 5), ("1f1b", False, None)]
    results = run_ranks(_pipeline_masks, 2, cases, timeout=280)
    again = run_ranks(_pipeline_masks, 2, [plain], timeout=280)  # run to run: other processes, same seed
    for rank in range(2):
        uninterrupted, fresh = results[rank].pop("resumed")
        for index, masks in uninterrupted.items():
            assert torch.equal(masks, fresh[index]), f"stage {index}: the step drew other masks in a fresh pipeline"
        for case, result in results[rank].items():
            assert not result["moved"], f"rank {rank} {case}: the layers' draws moved the process generator"
    assert results[0][unseeded]["seed"] == results[1][unseeded]["seed"] == 100, "ranks disagree on the base seed"
    interleaved = {index: masks for rank in range(2) for index, masks in results[rank][plain]["masks"].items()}
    assert sorted(interleaved) == [0, 1, 2, 3]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(interleaved[a], interleaved[b]), f"stages {a} and {b} drew the same masks"
        masks = interleaved[a]  # 2 steps x 4 micro-batches, all different
        assert len({tuple(m.flatten().tolist()) for m in masks}) == 8
    for rank in range(2):  # reproducible run to run
        for index, masks in again[rank][plain]["masks"].items():
            assert torch.equal(masks, results[rank][plain]["masks"][index])
        for name, grad in results[rank][plain]["grads"].items():
            torch.testing.assert_close(results[rank][remat]["grads"][name], grad, rtol=0, atol=1e-6,
                                       msg=f"rank {rank} {name}: re-materialization drew other masks")
    assert not torch.equal(*[results[rank][one_f_one_b]["masks"][rank] for rank in range(2)])


def _built_in_setup(rank: int, world_size: int, tmp: str) -> dict[str, torch.Tensor]:
    """A model whose layers ``setup()`` builds (Lightning's lazy-build hook) from torch's global generator after a
    draw of the script's own: its weights are one device's (the generators were reseeded at every fit before)."""
    import lightning as L

    from lightning_pipe import PipelineStrategy
    from tests.citizen_models import class_data

    class Lazy(L.LightningModule):
        def setup(self, stage: str) -> None:
            if not hasattr(self, "net"):
                self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    L.seed_everything(7, verbose=False)
    torch.randn(5)  # the script draws before the fit
    strategy = PipelineStrategy(num_microbatches=2, wait_timeout=60) if world_size > 1 else "auto"
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Lazy(), class_data(batches=1))
    path = f"{tmp}/lazy-{world_size}.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.timeout(120)
def test_a_model_built_in_setup_draws_one_devices_weights(tmp_path: Any) -> None:
    reference = _built_in_setup(0, 1, str(tmp_path))
    for state in run_ranks(_built_in_setup, 2, str(tmp_path), timeout=100):
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def _draws_after_each_call(rank: int, world_size: int, shuffle: bool, partition: str = "uniform"
                           ) -> list[list[float]]:
    """The script's draws from torch's generator after a validate, a test, a predict and a fit of a model that draws
    nothing itself (no dropout)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pipe import PipelineStrategy
    from tests.helpers import quiet_trainer

    torch.set_num_threads(1)

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val", F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1]))

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.log("test", F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1]))

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(3, verbose=False)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randn(16, generator=generator))

    def trainer(**options: Any) -> Any:
        strategy = PipelineStrategy(num_microbatches=2, partition=partition) if world_size > 1 else "auto"
        return quiet_trainer(world_size, strategy, **options)

    model, drawn = Plain(), []
    trainer().validate(model, DataLoader(data, batch_size=4, shuffle=shuffle))
    drawn.append(torch.rand(2).tolist())
    trainer().test(model, DataLoader(data, batch_size=4))
    drawn.append(torch.rand(2).tolist())
    trainer().predict(model, DataLoader(data, batch_size=4))
    drawn.append(torch.rand(2).tolist())
    trainer(max_epochs=2).fit(model, DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=4))
    drawn.append(torch.rand(2).tolist())
    return drawn


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("shuffle", "partition"), [(False, "uniform"), (True, "uniform"), (True, "profile")])
def test_the_scripts_draws_after_each_trainer_call_are_one_devices(shuffle: bool, partition: str) -> None:
    """One device's DataLoaders draw from torch's generator as each iteration starts (the workers' base seed, a
    shuffling sampler's seed), a pipeline's from private ones: a random_split in setup("fit") after a baseline
    trainer.validate() drew another split (found by review). The shared loaders now draw those numbers too; a
    planned cut's look at the first batch leaves the generator as it found it."""
    reference = _draws_after_each_call(0, 1, shuffle)
    for drawn in run_ranks(_draws_after_each_call, 2, shuffle, partition, timeout=100):
        assert drawn == reference


def _noise_from_the_modules_generator(rank: int, world_size: int, kind: str, tmp: str) -> dict[str, torch.Tensor]:
    """A diffusion-style step: noise drawn before the model from a generator the module keeps (seeded once, for
    reproducibility), and the loss against it; a maximum logged too, which the last stage checks by running the step
    once more on the whole batch at every step."""
    import warnings

    import lightning as L
    import numpy as np

    from lightning_pipe import PipelineStrategy
    from tests.helpers import quiet_trainer

    torch.set_num_threads(1)

    class Denoiser(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8))
            self.gen = torch.Generator().manual_seed(123) if kind.startswith("torch") else np.random.default_rng(123)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = batch[0]
            noise = torch.randn(x.shape, generator=self.gen) if kind.startswith("torch") else \
                torch.from_numpy(self.gen.standard_normal(tuple(x.shape))).float()
            pred = self.net(x + noise)
            if kind.endswith("max"):
                self.log("max_error", (pred - noise).abs().max())
            return F.mse_loss(pred, noise)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    L.seed_everything(0, verbose=False)
    strategy = PipelineStrategy(num_microbatches=2) if world_size > 1 else "auto"
    trainer = quiet_trainer(world_size, strategy, max_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Denoiser(), torch.utils.data.DataLoader(list(zip(x)), batch_size=4))
    trainer.save_checkpoint(f"{tmp}/{world_size}.ckpt")
    warned = [str(w.message) for w in caught if "neither a mean nor a sum" in str(w.message)]
    return {**torch.load(f"{tmp}/{world_size}.ckpt", weights_only=False)["state_dict"], "warned": warned}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["torch", "numpy", "torch-max"])
def test_a_generator_the_module_keeps_draws_alike_on_every_stage(kind: str, tmp_path: Any) -> None:
    """The last stage's extra runs of the step on the whole batch drew from the module's own generator too, so from
    the second step the loss's noise was not the model's input noise (weights 0.22 off, silently)."""
    reference = _noise_from_the_modules_generator(0, 1, kind, str(tmp_path))
    for state in run_ranks(_noise_from_the_modules_generator, 2, kind, str(tmp_path), timeout=100):
        assert not state.pop("warned")  # the loss check's run on the whole batch draws other noise: no verdict
        for key, value in reference.items():
            if key != "warned":
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


class _Augmented(torch.utils.data.TensorDataset):
    """Rows with a random augmentation drawn from torch's generator as they load, as torchvision's transforms draw."""

    def __getitem__(self, index: int) -> Any:
        x, y = super().__getitem__(index)
        return x + 0.05 * torch.randn(4), y


def _shuffled_order(rank: int, world_size: int, seeded: bool, how: str = "shuffle") -> dict[str, Any]:
    """The batches a 2-epoch fit reads from a shuffling DataLoader (by their first value), and what the run said of
    their order; ``how`` it shuffles: ``shuffle=True``, torch's BatchSampler over a RandomSampler, or a batch sampler
    of one's own shuffling buckets (a speech recipe's length bucketing)."""
    import logging

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_pipe import PipelineStrategy
    from tests.helpers import allow_workers, quiet_trainer

    torch.set_num_threads(1)
    allow_workers()
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("lightning.pytorch").addHandler(Keep())

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.seen: list[float] = []

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.seen.append(round(float(batch[0][0, 0]), 6))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Buckets(torch.utils.data.Sampler):
        def __init__(self, generator: torch.Generator | None) -> None:
            self.generator = generator

        def __iter__(self) -> Any:
            for bucket in torch.randperm(4, generator=self.generator).tolist():
                yield list(range(bucket * 4, bucket * 4 + 4))

        def __len__(self) -> int:
            return 4

    L.seed_everything(3, verbose=False)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16))
    generator = torch.Generator().manual_seed(0) if seeded else None
    model = Plain()
    strategy = PipelineStrategy(num_microbatches=2) if world_size > 1 else "auto"
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=generator) if how == "shuffle" else \
        DataLoader(data, batch_sampler=torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(data, generator=generator), 4, False)) if how == "batch_sampler" else \
        DataLoader(data, batch_sampler=Buckets(generator)) if how == "own" else \
        DataLoader(_Augmented(*data.tensors), batch_size=4, generator=generator, num_workers=1 if seeded else 0)
    quiet_trainer(world_size, strategy, max_epochs=2).fit(model, loader)
    return {"seen": model.seen, "said": [text for text in said
                                         if "the training DataLoader" in text and "global generator" in text]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("how", "fix"), [("shuffle", "DataLoader(..., shuffle=True, generator=torch.Generator()"),
                                          ("batch_sampler", "give the RandomSampler a generator of its own"),
                                          ("own", "give Buckets (or a sampler it draws from) a torch.Generator"),
                                          ("augmented", "load in workers (num_workers=1 or more) and give the "
                                                        "DataLoader a generator of its own")])
def test_a_shuffled_order_is_one_devices_with_a_seeded_generator_and_said_to_differ_without(how: str, fix: str) -> None:
    """Shuffled with torch's global generator, the ranks draw their order from an agreed seed, not one device's: said
    once, on rank 0, with what gives one device's order (found by review: no word at run time; then for a batch
    sampler, torch's or a length-bucketing one of one's own; then for augmentations drawn in the main process); with
    a generator of one's own, the order is one device's (the augmentations too, drawn in workers)."""
    reference = _shuffled_order(0, 1, True, how)
    for result in run_ranks(_shuffled_order, 2, True, how, timeout=100):
        assert result == {"seen": reference["seen"], "said": []}
    unseeded = run_ranks(_shuffled_order, 2, False, how, timeout=100)
    assert unseeded[0]["seen"] == unseeded[1]["seen"] and len(unseeded[0]["seen"]) == 8
    assert len(unseeded[0]["said"]) == 1 and fix in unseeded[0]["said"][0], unseeded[0]["said"]
    assert unseeded[1]["said"] == []
