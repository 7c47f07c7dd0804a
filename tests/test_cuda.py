"""CUDA paths: stage compute on a GPU (two ranks sharing one device over gloo, which stages messages through pinned
host memory on a communication stream of its own), every schedule, the strict transport, a recorded GPU timeline
in which communication overlaps compute, bf16 autocast and bf16 weights in the engine, and a Trainer with
``accelerator="gpu"`` in 32-bit and ``bf16-mixed`` precision launched as two torchrun "nodes". Skipped where no
CUDA device is present.

NCCL refuses two ranks on one device: :func:`test_nccl_on_two_gpus_equals_one_device` runs the NCCL transport
(``batch_isend_irecv`` groups of the comm plan, exact message sizes) on two GPUs and is skipped below two. One
command runs everything this machine can: ``python -m pytest tests/test_cuda.py -q``."""

from __future__ import annotations

import copy
import importlib.util
import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks, run_torchrun_nodes
from tests.models import make_batch, mlp, mse_loss, tuple_model

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (schedule, checkpoint_activations, rows): 10 rows in 4 micro-batches are 3, 3, 2, 2 (shapes change between them)
ENGINE_CASES = [("gpipe", False, 32), ("1f1b", False, 32), ("1f1b", True, 32), ("zb_h1", False, 32),
                ("interleaved_1f1b", False, 32), ("zb_v", False, 32), ("1f1b", False, 10),
                ("interleaved_1f1b", False, 10)]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def _engine_on_cuda(rank: int, world_size: int, mode: str, device: str = "cuda:0") -> list[dict[str, Any]]:
    """Each case: the pipeline's loss and gradients and a single-device reference, both computed on ``device``
    (``"per-rank"``: ``cuda:<rank>``, for NCCL)."""
    from lightning_pipe.engine.executor import Pipeline

    device = torch.device(f"cuda:{rank}" if device == "per-rank" else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reports = []
    cases = ENGINE_CASES if mode in ("fp32", "strict") else [("1f1b", False, 32), ("zb_h1", False, 32)]
    for schedule, remat, rows in cases:
        model = tuple_model(width=64) if rows == 10 and schedule == "1f1b" else mlp(num_layers=8, width=64)
        if mode == "bf16-true":
            model = model.to(torch.bfloat16)
        reference = copy.deepcopy(model).to(device)
        x, y = (t.to(device) for t in make_batch(rows, width=64))
        if mode == "bf16-true":
            x, y = x.bfloat16(), y.bfloat16()
        pipe = Pipeline(model, loss_fn=mse_loss, schedule=schedule, num_microbatches=4, checkpoint_activations=remat,
                        device=device, strict_p2p=mode == "strict")
        dtypes: list[torch.dtype] = []
        for module in pipe.modules():
            module.register_forward_hook(lambda _m, _i, out: dtypes.append(out[0].dtype if isinstance(out, tuple)
                                                                           else out.dtype))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16-mixed"):
            loss = pipe.train_step((x, y))
            ref_loss = mse_loss(reference(x), (x, y))
        train_dtypes = {str(d) for d in dtypes}  # the training forwards' (evaluation below runs outside autocast)
        ref_loss.backward()
        eval_loss, outputs = pipe.eval_step((x, y))
        if device.type == "cuda":
            torch.cuda.synchronize()
        grads = {name: p.grad.cpu() for name, p in pipe.named_parameters()}
        devices = {str(p.device) for p in pipe.parameters()}
        ref_grads = {name: p.grad.cpu() for name, p in reference.named_parameters() if name in grads}
        reports.append({"case": (schedule, remat, rows), "loss": None if loss is None else loss.float().cpu(),
                        "ref_loss": ref_loss.detach().float().cpu(), "grads": grads, "ref_grads": ref_grads,
                        "devices": devices, "dtypes": train_dtypes,
                        "eval_loss": None if eval_loss is None else eval_loss.float().cpu(),
                        "last": pipe.is_last_rank})
    return reports


def _check_engine_reports(results: list, devices: list[str]) -> None:
    for rank, reports in enumerate(results):
        assert len(reports) == len(ENGINE_CASES)
        for report in reports:
            assert report["devices"] == {devices[rank]}, report["case"]
            if report["last"]:
                torch.testing.assert_close(report["loss"], report["ref_loss"], rtol=0, atol=1e-5)
                torch.testing.assert_close(report["eval_loss"], report["ref_loss"], rtol=0, atol=1e-5)
            for name, grad in report["grads"].items():
                torch.testing.assert_close(grad, report["ref_grads"][name], rtol=0, atol=1e-5,
                                           msg=f"{report['case']} rank {rank} {name}")


@pytest.mark.parametrize("mode", ["fp32", "strict"])
def test_stage_compute_on_cuda_equals_one_device(mode: str) -> None:
    """fp32 (TF32 off, PyTorch's default for matmuls) on cuda:0: the same 1e-5 as on CPU, for every kind of
    synchronous schedule, tuples and changing shapes included; with the staged, overlapping transport and with the
    strict one (NCCL's ordering emulated)."""
    _check_engine_reports(run_ranks(_engine_on_cuda, 2, mode, timeout=240), ["cuda:0", "cuda:0"])


def _async_on_cuda(rank: int, world_size: int, mode: str, device: str = "cuda:0") -> float:
    from lightning_pipe.engine.executor import Pipeline
    from tests.test_async import Scalar, _batches, _loss

    device = torch.device(f"cuda:{rank}" if device == "per-rank" else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = torch.nn.Sequential(*[Scalar(0.5 + 0.25 * s) for s in range(world_size)])
    pipe = Pipeline(model, loss_fn=_loss, schedule=mode, num_microbatches=3, slack=1, device=device)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.2)
    for x, y in _batches(4, 3):
        pipe.train_step((x.to(device), y.to(device)), optimizer_step=optimizer.step)
    pipe.flush()
    return next(iter(pipe.parameters())).item()


@pytest.mark.parametrize("mode", ["async_1f1b", "2bw"])
def test_asynchronous_schedules_on_cuda_match_the_hand_computation(mode: str) -> None:
    from tests.test_async import _by_hand

    got = run_ranks(_async_on_cuda, 2, mode, timeout=120)
    assert got == pytest.approx(_by_hand(mode, 4, 3, 0.2, slack=1), rel=1e-5)


def _timeline_on_cuda(rank: int, world_size: int) -> list[dict[str, Any]]:
    """One recorded gpipe step of large activations: rank 0 runs its forwards back to back while each output's copy
    to pinned host memory runs on the communication stream. The layers are large enough (4 fp32 products of 4096 x
    2048 by 2048 x 2048 per forward, ~2 ms on an H200) that the GPU, not the host's launches, sets the pace: the host
    runs ahead, so a packing queued after forward k can run while forward k + 1 computes. (With ~0.1 ms layers the
    GPU waits for the host between forwards and nothing can overlap, whatever the transport does.)"""
    from lightning_pipe.engine.executor import Pipeline

    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    pipe = Pipeline(mlp(num_layers=8, width=2048), loss_fn=mse_loss, schedule="gpipe", num_microbatches=8,
                    device=device, record=True)
    batch = tuple(t.to(device) for t in make_batch(8 * 4096, width=2048))
    pipe.train_step(batch)  # warm-up: allocator, kernels, the channels' first layouts
    pipe.take_cuda_timeline()
    pipe.train_step(batch)
    return pipe.take_cuda_timeline()


def test_recorded_timeline_shows_communication_overlapping_compute() -> None:
    """The GPU's own clock (CUDA events): on rank 0, a message's packing on the communication stream runs while the
    next forward computes on the compute stream; the timeline comes back for inspection."""
    spans = run_ranks(_timeline_on_cuda, 2, timeout=180)[0]
    compute = [s for s in spans if s["stream"] == "compute"]
    packing = [s for s in spans if s["stream"] == "comm" and s["what"] == "pack"]
    assert len(compute) == 16 and len(packing) >= 8, spans
    overlaps = [(p, c) for p in packing for c in compute
                if min(p["end_ms"], c["end_ms"]) - max(p["start_ms"], c["start_ms"]) > 0]
    print("rank 0's GPU timeline (ms):\n" + "\n".join(f"  {s['stream']:8s} {s['what']:6s} {s['start_ms']:8.3f} "
                                                      f"{s['end_ms']:8.3f}" for s in spans))
    assert overlaps, "no packing ran while a forward computed"


@pytest.mark.parametrize("mode", ["bf16-mixed", "bf16-true"])
def test_bf16_on_cuda_is_close_to_one_device(mode: str) -> None:
    """Under autocast (bf16 activations cross the ranks) and with bf16 weights: bf16 keeps ~3 significant digits and
    micro-batches change the order of the sums, so gradients agree to 2% of their norm, losses to 1%."""
    results = run_ranks(_engine_on_cuda, 2, mode, timeout=240)
    for rank, reports in enumerate(results):
        for report in reports:
            assert report["dtypes"] == {"torch.bfloat16"}, report["case"]  # the stages really computed in bf16
            if rank == 1:
                assert report["loss"].item() == pytest.approx(report["ref_loss"].item(), rel=1e-2)
            for name, grad in report["grads"].items():
                assert grad.dtype == (torch.bfloat16 if mode == "bf16-true" else torch.float32)
                assert torch.isfinite(grad).all()
                assert _relative_error(grad, report["ref_grads"][name]) < 2e-2, (report["case"], rank, name)


SCRIPT = '''
import os, sys
import torch
import lightning as L
import lightning_pipe
from lightning_pipe import PipelineStrategy
from tests.lightning_models import Regressor, regression_data
from tests.test_cuda import precision_options

precision = sys.argv[2]
model = Regressor(width=64, lr=0.5)
stage_dtypes = set()
model.layers[0].register_forward_hook(lambda _m, _i, out: stage_dtypes.add(str(out.dtype)))
trainer = L.Trainer(strategy=PipelineStrategy(num_stages=2, process_group_backend="gloo"), accelerator="gpu",
                    devices=1, num_nodes=2, max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    **precision_options(precision))
trainer.fit(model, regression_data(6, batch_size=8, width=64))
torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "rank": trainer.global_rank,
            "device": str(trainer.strategy.root_device), "dtypes": stage_dtypes},
           os.path.join(sys.argv[1], f"{precision}-rank{trainer.global_rank}.pt"))
'''


def precision_options(precision: str) -> dict[str, Any]:
    """The Trainer's precision; ``16-mixed`` with a scaler starting at 256, where no step overflows: which steps
    overflow at float16's default 65536 depends on how the batch is split (a micro-batch's gradients are smaller), so
    the pipeline and one GPU would skip different steps (the skips themselves: tests/test_strategy_grad_scaler.py)."""
    if precision != "16-mixed":
        return {"precision": precision}
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cuda", scaler=torch.amp.GradScaler("cuda", init_scale=256.0))]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_trainer_on_gpu_equals_one_gpu(tmp_path: Path, precision: str) -> None:
    """Two torchrun "nodes" of one process each share cuda:0 (gloo between them) and train 2 stages; one GPU
    trains the same model alone with the same precision (``16-mixed``: float16 with CUDA's gradient scaler)."""
    import lightning as L

    from tests.lightning_models import Regressor, regression_data
    from tests.test_strategy_trainer import _full_state

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_torchrun_nodes(script, str(tmp_path), precision, nproc_per_node=1, timeout=150)
    reference = Regressor(width=64, lr=0.5)
    initial = copy.deepcopy(reference.state_dict())
    L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False,
              **precision_options(precision)).fit(reference, regression_data(6, 8, width=64))
    ranks = [torch.load(tmp_path / f"{precision}-rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert [r["device"] for r in ranks] == ["cuda:0", "cuda:0"]
    assert ranks[0]["dtypes"] == {{"bf16-mixed": "torch.bfloat16", "16-mixed": "torch.float16"}.get(precision,
                                                                                                   "torch.float32")}
    full = _full_state([r["state"] for r in ranks])
    tolerance = 1e-5 if precision == "32-true" else 2e-3
    moved = max((value.cpu() - initial[key].cpu()).abs().max().item() for key, value in reference.state_dict().items())
    assert moved > 10 * tolerance, f"training moved the weights by {moved} at most: the test could not tell"
    error = max((full[key] - value.cpu()).abs().max().item() for key, value in reference.state_dict().items())
    print(f"{precision}: weights moved up to {moved:.3g}; the pipeline's differ from one GPU's by {error:.3g} at most")
    for key, value in reference.state_dict().items():
        value = value.cpu()
        torch.testing.assert_close(full[key], value, rtol=0, atol=tolerance, msg=f"{precision} {key}")


REPLICATED_SCRIPT = '''
import functools, os, sys
import torch
import lightning as L
import lightning_pipe
from lightning_pipe import PipelineStrategy
from tests.lightning_models import Regressor, regression_data
from tests.test_strategy_replicas import one_device_loader

layout = sys.argv[2]
model = Regressor(width=64, lr=0.5)
strategy = (PipelineStrategy(num_stages=2, process_group_backend="gloo") if layout == "2x2" else
            PipelineStrategy(replicas=[3, 1], partition=[6, 2], process_group_backend="gloo"))
loader = (regression_data(6, batch_size=8, width=64) if layout == "2x2" else
          one_device_loader(3, 16, functools.partial(regression_data, width=64)))
trainer = L.Trainer(strategy=strategy, accelerator="gpu", devices=1, num_nodes=4, max_steps=3, gradient_clip_val=0.3,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, loader)
torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "device": str(trainer.strategy.root_device)},
           os.path.join(sys.argv[1], f"{layout}-rank{trainer.global_rank}.pt"))
'''


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", ["2x2", "3-1"])
def test_replicated_stages_on_gpu_equal_one_gpu(tmp_path: Path, layout: str) -> None:
    """Four torchrun "nodes" share cuda:0: 2 stages x 2 replicas (gradients averaged by gloo all-reduces of CUDA
    tensors, on a DeviceMesh of device type cuda) and PipeDream's 3-1 (summed), with clipping by the global
    norm, against one GPU on the same rows (SGD: Adam magnifies float rounding where gradients are near zero)."""
    import lightning as L

    from tests.lightning_models import Regressor, regression_data
    from tests.test_strategy_replicas import one_device_loader
    from tests.test_strategy_trainer import _full_state

    script = tmp_path / "train.py"
    script.write_text(REPLICATED_SCRIPT)
    run_torchrun_nodes(script, str(tmp_path), layout, nnodes=4, nproc_per_node=1, timeout=180)
    reference = Regressor(width=64, lr=0.5)
    L.Trainer(accelerator="gpu", devices=1, max_steps=3, gradient_clip_val=0.3, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(
                  reference, one_device_loader(3, 16, functools.partial(regression_data, width=64)))
    ranks = [torch.load(tmp_path / f"{layout}-rank{rank}.pt", weights_only=False) for rank in range(4)]
    assert {r["device"] for r in ranks} == {"cuda:0"}
    initial = Regressor(width=64).state_dict()
    assert max((v.cpu() - initial[k]).abs().max().item() for k, v in reference.state_dict().items()) > 1e-2
    pairs = [(0, 2), (1, 3)] if layout == "2x2" else [(0, 3), (1, 3), (2, 3)]  # (stage 0, stage 1) of each copy
    for first, last in pairs:
        full = _full_state([ranks[first]["state"], ranks[last]["state"]])
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(full[key], value.cpu(), rtol=0, atol=1e-5, msg=f"{layout} ranks {first} {key}")


# -- any model on a GPU: the captured path, meta-device builds ------------------------------------
# Families of the capture tests (Hugging Face decoders and an encoder-decoder, litgpt, ViTs from this repository,
# torchvision and timm, a model kept in hyper-parameters, layers called from the module's own forward) and models
# built on the meta device (configure_model; init_module(empty_init=True) with a tied head; a Hugging Face Llama).
# Batch norms are left out: one GPU normalizes over the whole batch, a pipeline over each micro-batch.
GPU_FAMILIES = ["hf_gpt2", "hf_llama", "hf_t5", "litgpt", "vit", "forward", "hparams", "tv_vit",
                "timm_vit_tiny_patch16_224"]
GPU_META = ["lazy", "tied", "meta_hf_llama"]

CAPTURED_SCRIPT = """
import sys
from tests.test_cuda import fit_on_gpu

fit_on_gpu(sys.argv[1], sys.argv[2].split(","), sys.argv[3], pipelined=True, accelerator=sys.argv[4])
"""


def fit_on_gpu(out: str, names: list[str], precision: str, pipelined: bool, accelerator: str = "gpu") -> None:
    """Fit each of ``names`` for three steps on cuda:0 and validate it, as two torchrun nodes' pipeline (``1f1b``, 4
    micro-batches, gloo between the ranks) or on one GPU; each rank's weights and validation loss go to ``out``.
    TF32 is off (cuDNN convolutions use it by default): its rounding would depend on the micro-batch's size."""
    import os

    import lightning as L

    from lightning_pipe import PipelineStrategy
    from tests.big_models import LazyRegressor, built_like_the_strategy
    from tests.lightning_models import TiedLM, regression_data, token_data
    from tests.test_strategy_capture import SEED, _captured, _data, _module

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name in names:
        def trainer(**options: Any) -> Any:
            if pipelined:
                options.update(num_nodes=2, strategy=PipelineStrategy(schedule="1f1b", num_microbatches=4,
                                                                       process_group_backend="gloo"))
            return L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                             precision=precision, **options)

        fitting = trainer(max_steps=3)
        family = name.removeprefix("meta_")
        if family in ("lazy", "tied"):
            data = regression_data(3) if family == "lazy" else token_data(3)
        else:
            data, validation = _data(family), _data(family, 50, [(8, 14)])
        L.seed_everything(SEED, verbose=False)
        make = {"lazy": LazyRegressor, "tied": TiedLM}.get(family, functools.partial(_module, family))
        if name in GPU_META and pipelined:  # built on meta: each rank materializes its own layers on the GPU
            with fitting.init_module(empty_init=True):
                model = make()  # LazyRegressor has none yet: the strategy calls its configure_model on meta
            on_meta = all(p.is_meta for p in model.parameters())
        elif name in GPU_META:  # the one-GPU reference: every tensor materialized as the pipeline materializes its own
            model = _materialized_on(torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu"), make,
                                     built_like_the_strategy, SEED)
        else:
            model = make()
        if not pipelined or name not in GPU_META:
            on_meta = False
        fitting.fit(model, data)
        loss = None
        if type(model).validation_step is not L.LightningModule.validation_step:
            loss = trainer().validate(model, validation, verbose=False)[0]["val_loss"]  # the families' own
        rank = fitting.global_rank
        torch.save({"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "val_loss": loss,
                    "device": str(fitting.strategy.root_device), "captured": _captured(model),
                    "built_on_meta": on_meta, "left_on_meta": any(p.is_meta for p in model.parameters())},
                   os.path.join(out, f"{name}-{'pipe' if pipelined else 'one'}-rank{rank}.pt"))


def _materialized_on(device: torch.device, make: Any, built_like_the_strategy: Any, seed: int) -> Any:
    from lightning_pipe.strategy.materialize import LocalMaterializer
    from lightning_pipe.strategy.split import find_sequence

    with built_like_the_strategy():
        model = make()
        if hasattr(model, "configure_model"):
            model.configure_model()
    sequence = model.model if hasattr(model, "model") and not hasattr(model, "layers") else find_sequence(model)[1]
    LocalMaterializer(model, sequence, device, seed)([sequence])
    return model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_captured_and_meta_built_models_on_gpu_equal_one_gpu(tmp_path: Path, precision: str) -> None:
    """Models that are not one ``nn.Sequential`` (captured, then cut) and models built on the meta device train and
    validate on a GPU as a pipeline of two torchrun nodes like one GPU: 1e-4 in float32 (the GPU's kernels for a
    micro-batch's and a whole batch's sizes sum in other orders), 1e-2 under bf16-mixed (validation losses: 1e-5 and
    2e-2 relative)."""
    pytest.importorskip("transformers")
    names = GPU_FAMILIES + GPU_META if precision == "32-true" else ["hf_llama", "litgpt", "meta_hf_llama"]
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
        names = [name for name in names if not name.startswith(("tv_", "timm_"))]
    compare_pipeline_with_one_device(tmp_path, names, precision)


def compare_pipeline_with_one_device(tmp_path: Path, names: list[str], precision: str,
                                     accelerator: str = "gpu") -> None:
    """:func:`fit_on_gpu` as a pipeline and on one device (a dry run on CPU: ``accelerator="cpu"``), compared."""
    script = tmp_path / "train.py"
    script.write_text(CAPTURED_SCRIPT)
    run_torchrun_nodes(script, str(tmp_path), ",".join(names), precision, accelerator, nproc_per_node=1, timeout=240)
    fit_on_gpu(str(tmp_path), names, precision, pipelined=False, accelerator=accelerator)
    failures = []
    for name in names:
        (one,) = [torch.load(tmp_path / f"{name}-one-rank0.pt", weights_only=False)]
        ranks = [torch.load(tmp_path / f"{name}-pipe-rank{rank}.pt", weights_only=False) for rank in range(2)]
        device = "cuda:0" if accelerator == "gpu" else "cpu"
        assert [r["device"] for r in ranks] == [one["device"]] * 2 == [device] * 2, name
        assert all(r["captured"] for r in ranks) == (name not in ("lazy", "tied")), name
        assert all(r["built_on_meta"] == (name in GPU_META) for r in ranks), f"{name}: built on meta or not"
        assert not any(r["left_on_meta"] for r in ranks), f"{name}: a parameter stayed on the meta device"
        merged = _full_state_of(ranks)
        assert merged.keys() == one["state"].keys(), f"{name}: {sorted(set(merged) ^ set(one['state']))}"
        error = max((merged[k].float() - v.float()).abs().max().item() for k, v in one["state"].items())
        assert (one["val_loss"] is None) == (name in ("lazy", "tied")), name
        loss_error = 0.0 if one["val_loss"] is None else \
            max(abs(r["val_loss"] - one["val_loss"]) for r in ranks) / max(abs(one["val_loss"]), 1e-6)
        print(f"{precision} {name}: weights differ from one GPU's by {error:.3g} at most, validation loss "
              f"{ranks[1]['val_loss']} vs {one['val_loss']}")
        tolerance = 1e-4 if precision == "32-true" else 1e-2
        if error > tolerance or loss_error > (1e-5 if precision == "32-true" else 2e-2):
            failures.append(f"{name}: weights {error:.3g}, validation loss relative {loss_error:.3g}")
    assert not failures, failures


def _full_state_of(ranks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for rank in ranks:
        merged.update(rank["state"])
    return merged


# -- NCCL: two GPUs --------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: two GPUs")
def test_nccl_on_two_gpus_equals_one_device() -> None:
    """Rank r on cuda:r over NCCL: every synchronous schedule (tuples, changing shapes), evaluation, and the
    asynchronous schedules through start, steady states and drain, each against one device at 1e-5."""
    results = run_ranks(_engine_on_cuda, 2, "fp32", "per-rank", timeout=280, backend="nccl")
    _check_engine_reports(results, ["cuda:0", "cuda:1"])
    from tests.test_async import _by_hand

    for mode in ("async_1f1b", "2bw"):
        got = run_ranks(_async_on_cuda, 2, mode, "per-rank", timeout=120, backend="nccl")
        assert got == pytest.approx(_by_hand(mode, 4, 3, 0.2, slack=1), rel=1e-5)


if __name__ == "__main__":  # the GPU machine's check: python tests/test_cuda.py
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider", *sys.argv[1:]]))
