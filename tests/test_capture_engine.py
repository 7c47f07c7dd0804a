"""Captured segments run in the engine exactly: every family on 2 and 4 gloo ranks, gpipe, 1f1b, zb_h1 (with its
weight half split) and interleaved_1f1b, against one process (loss and every gradient, the weights after 3 steps of
batches whose sequence length and size change, an eval step); dropout models train; static and meta-device captures
work on every rank."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_pipe.capture import Splitter
from lightning_pipe.engine import launch
from lightning_pipe.engine.cut import stage_sizes
from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import microbatch_weights, split_batch
from tests.capture_models import FAMILIES, HAS_TRANSFORMERS, ViT, family, hf_gpt2
from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(600)

if HAS_TRANSFORMERS:  # imported once by the fork server rather than by every rank
    launch.PRELOAD[:] = [*launch.PRELOAD, "lightning_pipe.capture", "transformers.models.gpt2.modeling_gpt2",
                         "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert"]

NUM_MICROBATCHES = 4
ONE_STEP_SCHEDULES = ["gpipe", "1f1b", "zb_h1", "interleaved_1f1b"]  # interleaved where there are 2 segments a rank
# three steps: a full batch, one of another sequence length, and a last partial batch of yet another
STEPS = [(8, 16), (8, 12), (6, 10)]


def _canonical_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) -> its first name`` (a tied parameter has several)."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def _ties(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The tied parameters' canonical names and shapes."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    names = _canonical_names(model)
    return {names[id(p)]: p.shape for p in model.parameters() if counts[id(p)] > 1}


def _local(pipe: Pipeline, names: dict[int, str]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by their canonical names (a stage's names are ``"<segment>.<model name>"``)."""
    return {names[id(p)]: p for p in pipe.parameters()}


def _sum_tied_gradients(pipe: Pipeline, names: dict[int, str], ties: dict[str, torch.Size]) -> None:
    """What the strategy's TiedParameters does: every holder of a tied parameter gets the sum of their gradients."""
    local = _local(pipe, names)
    for name, shape in ties.items():
        param = local.get(name)
        total = param.grad.clone() if param is not None and param.grad is not None else torch.zeros(shape)
        dist.all_reduce(total)
        if param is not None:
            param.grad = total


def _reference_step(model: torch.nn.Module, fam: Any, batch: tuple, backward: bool = True) -> torch.Tensor:
    """One process, micro-batch by micro-batch as the pipeline cuts the batch (BatchNorm normalizes the same rows);
    the batch norms' running statistics as the pipeline's deferred batch norms keep them: the statistics of what each
    saw over the whole batch (its micro-batches' inputs together), committed once per step."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats]
    before = [{k: v.clone() for k, v in m.named_buffers()} for m in norms]
    seen: dict[int, list[torch.Tensor]] = {id(m): [] for m in norms}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen[id(m)].append(args[0].detach())) for m in norms]
    microbatches = split_batch(batch, NUM_MICROBATCHES)
    total = torch.zeros(())
    try:
        for mb, weight in zip(microbatches, microbatch_weights(microbatches)):
            args, kwargs = fam.call(mb)
            loss = fam.loss(model(*args, **kwargs), mb)
            if backward:
                (loss * weight).backward()
            total += loss.detach() * weight
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        for norm, buffers in zip(norms, before):
            inputs = torch.cat(seen[id(norm)]).transpose(0, 1).flatten(1).double()  # channels x (rows x positions)
            momentum = norm.momentum if norm.momentum is not None else 1.0 / (buffers["num_batches_tracked"] + 1)
            norm.running_mean.copy_((1 - momentum) * buffers["running_mean"] + momentum * inputs.mean(1))
            norm.running_var.copy_((1 - momentum) * buffers["running_var"] + momentum * inputs.var(1))
            norm.num_batches_tracked.copy_(buffers["num_batches_tracked"] + 1)
    return total


def _train(rank: int, world_size: int, name: str, schedules: list[str], steps_schedule: str,
           evaluate: bool = False) -> dict:
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = fam.make().train()
    initial = copy.deepcopy(model.state_dict())
    names, ties = _canonical_names(model), _ties(model)
    splitter = Splitter(model)
    first = split_batch(fam.batch(*STEPS[0], 0), NUM_MICROBATCHES)[0]
    segments = splitter.segments(*fam.call(first))  # captured from the first micro-batch, as the strategy will

    def input_fn(mb: tuple) -> tuple:
        return splitter.flat_inputs(*fam.call(mb))

    one_step = []
    for schedule in schedules:
        stages = world_size * (2 if schedule == "interleaved_1f1b" else 1)
        if stages > len(segments):
            continue
        model.load_state_dict(initial)
        model.zero_grad(set_to_none=True)
        reference = copy.deepcopy(model)
        pipe = Pipeline(segments, loss_fn=fam.loss, input_fn=input_fn, schedule=schedule,
                        num_microbatches=NUM_MICROBATCHES)
        batch = fam.batch(*STEPS[0], 0)
        loss = pipe.train_step(batch)
        ref_loss = _reference_step(reference, fam, batch)
        grads = {k: p.grad for k, p in _local(pipe, names).items()}
        split = [getattr(stage, "_split_mode", None) for stage in pipe.stages.values()]
        one_step.append({"schedule": schedule, "loss": loss, "ref_loss": ref_loss, "grads": grads, "split": split,
                         "ref_grads": {k: p.grad for k, p in reference.named_parameters() if k in grads}})

    model.load_state_dict(initial)
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    pipe = Pipeline(segments, loss_fn=fam.loss, input_fn=input_fn, schedule=steps_schedule,
                    num_microbatches=NUM_MICROBATCHES)
    # SGD, not Adam: Adam divides by the gradient's own size, so on a parameter whose gradient is zero in exact
    # arithmetic (the key bias of attention) it turns float noise of 1e-10 into steps of 1e-6
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step, (rows, length) in enumerate(STEPS):
        batch = fam.batch(rows, length, 10 + step)
        pipe.train_step(batch)
        _sum_tied_gradients(pipe, names, ties)
        optimizer.step()
        optimizer.zero_grad()
        _reference_step(reference, fam, batch)
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    evaluation = None
    if evaluate:  # an eval capture, made on every rank from the first micro-batch, as the strategy will
        for module in (model, reference, *segments):
            module.eval()
        batch = fam.batch(*STEPS[0], 20)
        splitter.capture(*fam.call(split_batch(batch, NUM_MICROBATCHES)[0]), training=False)
        loss, outputs = pipe.eval_step(batch)
        with torch.no_grad():
            evaluation = (loss, _reference_step(reference, fam, batch, backward=False), outputs is not None)
    held = {k for s in pipe.modules() for seg in s for k in seg.state_dict()}
    state = {k: v.clone() for k, v in model.state_dict().items() if k in held}
    ref_state = {k: v for k, v in reference.state_dict().items() if k in held}
    return {"one_step": one_step, "state": state, "ref_state": ref_state, "ties": sorted(ties),
            "parameters": sorted(set(names.values())),
            "captures": len(splitter.captures), "evaluation": evaluation}


def _check(results: list[dict], name: str, world_size: int) -> None:
    ties = results[0]["ties"]
    for index in range(len(results[0]["one_step"])):
        reports = [r["one_step"][index] for r in results]
        schedule = reports[0]["schedule"]
        if schedule == "zb_h1":  # the segments' weight ops stood in for modules: the weight half was split, exactly
            assert all(r["split"] == ["captured"] for r in reports), f"{name}: {[r['split'] for r in reports]}"
        losses = [r["loss"] for r in reports if r["loss"] is not None]
        assert len(losses) == 1, f"{name} {schedule}: one rank holds the loss"
        torch.testing.assert_close(losses[0], reports[0]["ref_loss"], rtol=0, atol=1e-6, msg=f"{name} {schedule}")
        summed: dict[str, torch.Tensor] = {}
        for report in reports:
            for key, grad in report["grads"].items():
                assert grad is not None, f"{name} {schedule}: {key} got no gradient"
                summed[key] = summed[key] + grad if key in summed else grad
            for key, expected in report["ref_grads"].items():
                if key not in ties:
                    torch.testing.assert_close(report["grads"][key], expected, rtol=0, atol=1e-6,
                                               msg=f"{name} {schedule} {key}")
        for key in ties:  # each holder has its uses' share; together, the whole gradient
            expected = next(r["ref_grads"][key] for r in reports if key in r["ref_grads"])
            torch.testing.assert_close(summed[key], expected, rtol=0, atol=1e-6, msg=f"{name} {schedule} {key}")
        assert set(summed) == set(results[0]["parameters"]), f"{name} {schedule}: every parameter is on some rank"
    for rank, result in enumerate(results):
        assert result["state"], f"{name}: rank {rank} holds no state"
        evaluation = result["evaluation"]
        assert result["captures"] == (2 if evaluation else 1), f"{name}: one dynamic capture per mode"
        if evaluation and evaluation[0] is not None:
            assert evaluation[2], f"{name}: the last stage returns the outputs of an eval step"
            torch.testing.assert_close(evaluation[0], evaluation[1], rtol=0, atol=1e-6, msg=f"{name} eval")
        for key, value in result["state"].items():
            torch.testing.assert_close(value, result["ref_state"][key], rtol=0, atol=1e-6,
                                       msg=f"{name} after {len(STEPS)} steps, rank {rank}: {key}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_train_exactly_on_two_ranks(name: str) -> None:
    family(name)
    results = run_ranks(_train, 2, name, ONE_STEP_SCHEDULES, "1f1b", True, timeout=500)
    assert len(results[0]["one_step"]) == len(ONE_STEP_SCHEDULES)
    assert sum(r["evaluation"][0] is not None for r in results) == 1, "the last stage has the eval loss"
    _check(results, name, 2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_train_exactly_on_four_ranks(name: str) -> None:
    family(name)
    results = run_ranks(_train, 4, name, ONE_STEP_SCHEDULES, "gpipe", timeout=500)
    assert len(results[0]["one_step"]) >= 3  # interleaved_1f1b needs 8 segments: ResNet has them
    _check(results, name, 4)


def _inputs_of(splitter: Splitter, fam: Any) -> Any:
    """The engine's ``input_fn``: a micro-batch -> segment 0's input (the flattened model call)."""
    return lambda mb: splitter.flat_inputs(*fam.call(mb))


def _dropout(rank: int, world_size: int, make: str) -> list[dict]:
    results = []
    for remat in (False, True):
        torch.manual_seed(0)
        model = (hf_gpt2(dropout=0.2) if make == "hf_gpt2" else ViT(dropout=0.3)).train()
        fam = FAMILIES[make]
        splitter = Splitter(model)
        batch = fam.batch(8, 16, 0)
        segments = splitter.segments(*fam.call(split_batch(batch, NUM_MICROBATCHES)[0]))
        pipe = Pipeline(segments, loss_fn=fam.loss, input_fn=_inputs_of(splitter, fam), schedule="gpipe",
                        num_microbatches=NUM_MICROBATCHES, checkpoint_activations=remat)
        torch.manual_seed(100 + rank)
        loss = pipe.train_step(batch)
        results.append({"loss": loss, "grads": {k: p.grad for k, p in pipe.named_parameters()}})
    return results


@pytest.mark.parametrize("make", ["hf_gpt2", "vit"])
def test_dropout_models_train_and_rematerialization_replays_their_masks(make: str) -> None:
    if make == "hf_gpt2":
        family("hf_gpt2")
    for plain, remat in run_ranks(_dropout, 2, make, timeout=300):
        assert (plain["loss"] is None) == (remat["loss"] is None)
        if plain["loss"] is not None:
            assert torch.isfinite(plain["loss"])
            torch.testing.assert_close(remat["loss"], plain["loss"], rtol=0, atol=1e-6)
        assert any(g.abs().sum() > 0 for g in plain["grads"].values())
        for key, grad in plain["grads"].items():
            torch.testing.assert_close(remat["grads"][key], grad, rtol=0, atol=1e-6, msg=key)


def _static_and_meta(rank: int, world_size: int) -> dict:
    """Static captures (every rank captures each micro-batch's shape) and a model built on the meta device, of which
    each rank materializes only its own segments and loads their weights by the model's names."""
    fam = FAMILIES["litgpt"]
    torch.manual_seed(0)
    real = fam.make().train()
    with torch.device("meta"):
        torch.manual_seed(0)
        model = fam.make().train()
    splitter = Splitter(model, dynamic=False)
    batches = [fam.batch(4, 8, 1), fam.batch(4, 12, 2)]
    for batch in batches:  # what the strategy will do on every rank: capture each micro-batch's pattern
        for mb in split_batch(batch, 2):
            splitter.capture(*fam.call(mb))
    segments = splitter.segments()
    sizes = stage_sizes(segments, world_size)
    start = sum(sizes[:rank])
    local = splitter.materialize(range(start, start + sizes[rank]), "cpu")
    full = {**real.state_dict(), **dict(real.named_buffers())}
    for segment in local:
        segment.load_state_dict({k: full[k] for k in segment.state_dict()})
        for key, buffer in segment.named_buffers():
            buffer.copy_(full[key])  # non-persistent rope tables are not in a checkpoint
    pipe = Pipeline(segments, loss_fn=fam.loss, input_fn=lambda mb: splitter.flat_inputs(*fam.call(mb)),
                    schedule="1f1b", num_microbatches=2)
    names = _canonical_names(model)
    out: dict[str, Any] = {"losses": [], "ref_losses": [], "grads": [], "ref_grads": [],
                           "captures": len(splitter.captures)}
    for batch in batches:
        for module in (model, real):
            module.zero_grad(set_to_none=True)
        out["losses"].append(pipe.train_step(batch))
        out["grads"].append({names[id(p)]: p.grad for p in pipe.parameters()})
        microbatches = split_batch(batch, 2)
        loss = sum(fam.loss(real(*fam.call(mb)[0], **fam.call(mb)[1]), mb) * w
                   for mb, w in zip(microbatches, microbatch_weights(microbatches)))
        loss.backward()
        out["ref_losses"].append(loss.detach())
        out["ref_grads"].append({k: p.grad for k, p in real.named_parameters()})
    return out


def test_static_and_meta_device_captures_on_every_rank() -> None:
    results = run_ranks(_static_and_meta, 2, timeout=300)
    assert all(r["captures"] == 2 for r in results), "one static capture per sequence length"
    for step in range(2):
        torch.testing.assert_close(results[1]["losses"][step], results[1]["ref_losses"][step], rtol=0, atol=1e-6)
        tied = results[0]["grads"][step]["transformer.wte.weight"] + results[1]["grads"][step]["transformer.wte.weight"]
        torch.testing.assert_close(tied, results[0]["ref_grads"][step]["transformer.wte.weight"], rtol=0, atol=1e-6)
        for result in results:
            for key, grad in result["grads"][step].items():
                if key != "transformer.wte.weight":
                    torch.testing.assert_close(grad, result["ref_grads"][step][key], rtol=0, atol=1e-6, msg=key)
