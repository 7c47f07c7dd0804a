"""What a captured forward does besides its ops, which a graph would not repeat at each run: random numbers drawn
(LayerDrop's branch, Python's and NumPy's generators), assignments to its modules, a module converted in place,
torch's activation checkpoints. Each is refused with what to do, or kept as one device keeps it."""

from __future__ import annotations

import copy
import warnings
import random
from random import random as draw

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune

from lightning_pipe.capture import CaptureError, Splitter
from tests.test_capture_errors import Blocks

pytestmark = pytest.mark.timeout(120)

class LayerDrop(nn.Module):
    """Skips its second layer at random in training, as Hugging Face's encoders with ``layerdrop > 0``."""

    def __init__(self, layerdrop: float) -> None:
        super().__init__()
        self.layers, self.layerdrop = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]), layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            dropout_probability = torch.rand([])
            if self.training and dropout_probability < self.layerdrop:
                continue
            x = layer(x)
        return x


def test_layer_drop_says_to_set_it_to_zero() -> None:
    with pytest.raises(CaptureError, match="LayerDrop skips layers at random.*set the model's layer drop"):
        Splitter(LayerDrop(0.1)).segments((torch.randn(2, 8),))


class Router(nn.Module):
    """Converts its classifier to float32 on every call, as Switch Transformers' router does."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.classifier = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        self.classifier = self.classifier.to(torch.float32)
        return self.classifier(x)


def test_a_module_converted_to_what_it_is_in_its_forward_is_captured() -> None:
    """torch's Module._apply swapped each parameter with itself, which export refused ("Couldn't swap")."""
    torch.manual_seed(0)
    model = Router()
    x = torch.randn(2, 8)
    torch.testing.assert_close(Splitter(model).run(x), model(x), rtol=0, atol=0)


class Checkpointed(nn.Module):
    """A layer under torch's activation checkpoint, reentrant or not."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.linear, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_an_activation_checkpoint_runs_plainly_with_a_warning(reentrant: bool) -> None:
    """A checkpoint's layers are traced as plain ops: gradients as eagerly, and a warning that the memory saving is
    PipelineStrategy(checkpoint_activations=True)'s to make. The reentrant variant (Hugging Face's
    gradient_checkpointing_enable() default before transformers 5) runs its layers under no_grad and recomputes them
    in its own backward: kept as a no_grad region, the graph gave that layer and every one before it no gradient
    (it was refused for that, then)."""
    torch.manual_seed(0)
    model = Blocks(Checkpointed(reentrant))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"checkpoints activations .*module 'blocks\.1'.*checkpoint_activations=True"):
        out = Splitter(model).run(x)
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-6, msg=name)
    with warnings.catch_warnings():  # where the pipeline re-materializes its stages already, nothing to say
        warnings.simplefilter("error")
        Splitter(copy.deepcopy(reference), rematerialized=True).run(x)
        Splitter(copy.deepcopy(reference).eval()).run(x)  # nor in evaluation, which keeps no activations


class CheckpointedFirst(nn.Module):
    """A reentrant checkpoint of the first layer, on an input that needs no gradient: torch gives that layer none
    (its Function's output needs none), as it would a checkpointed block after a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Checkpointed(reentrant=True), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_a_reentrant_checkpoint_of_inputs_needing_no_gradient_is_refused() -> None:
    """Its layers get no gradient eagerly; run under no_grad in the graph, they would get none either, but that stayed
    after the layers before them were unfrozen (BackboneFinetuning freezes at setup, before the capture), where
    eagerly they train: silently no gradient. Refused, with use_reentrant=False as the fix (traced plainly: exact)."""
    with pytest.raises(CaptureError, match=r"no input of the checkpoint needs a gradient, in module 'first'.*"
                                           r"use_reentrant=False"):
        Splitter(CheckpointedFirst()).segments((torch.randn(2, 8),))
    with torch.no_grad():  # no gradient anywhere: nothing to keep
        Splitter(CheckpointedFirst()).segments((torch.randn(2, 8),))


class HostRandom(nn.Module):
    """A layer skipped at random with Python's ``random`` (a LayerDrop written so), or scaled by a NumPy mask, or
    skipped through a function imported from ``random`` by name."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.linear, self.how = nn.Linear(8, 8), how
        self.rng = {"numpy_owned": np.random.default_rng(0), "legacy_owned": np.random.RandomState(0),
                    "python_owned": random.Random(0)}.get(how)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "python":
            return x if random.random() < 0.5 else self.linear(x)
        if self.how in ("numpy_owned", "legacy_owned"):  # a feature mask from a generator the layer keeps
            return self.linear(x) * torch.from_numpy(self.rng.random(8) < 0.5).float()
        if self.how == "python_owned":
            return x if self.rng.random() < 0.5 else self.linear(x)
        if self.how == "numpy":
            return self.linear(x) * torch.from_numpy(np.random.rand(8) < 0.5).float()
        return x if draw() < 0.5 else self.linear(x)


@pytest.mark.parametrize(("how", "where"), [
    ("python", r"random\.random in module 'blocks\.1' \(HostRandom\.forward"),
    ("numpy", r"numpy\.random\.rand in module 'blocks\.1' \(HostRandom\.forward"),
    ("by_name", r"Python's random module \(a function imported from it by name\)"),
    ("numpy_owned", r"numpy\.random\._generator\.Generator self\.rng of module 'blocks\.1' \(a generator the model "),
    ("legacy_owned", r"RandomState self\.rng of module 'blocks\.1'"),
    ("python_owned", r"random\.Random self\.rng of module 'blocks\.1'"),
])
def test_random_numbers_drawn_outside_torch_are_refused_and_the_generators_left_alone(how: str, where: str) -> None:
    """Export runs the forward once: what Python's ``random`` or NumPy's global generator drew there became a constant
    of the graph, or the branch every step took (the layer was skipped at every step, or never), silently; one device
    draws anew each step. Refused, with the place; the generators are as they were before the capture."""
    random.seed(1)
    np.random.seed(1)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with pytest.raises(CaptureError, match=where) as caught:
        Splitter(Blocks(HostRandom(how))).segments((torch.randn(2, 8),))
    assert "Draw with torch instead" in str(caught.value)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and np.random.get_state()[2] == numpy_state[2]
    if how.endswith("_owned"):  # the model's own generator too: its next draw is its first
        layer = HostRandom(how)
        model = Blocks(layer)
        with pytest.raises(CaptureError):
            Splitter(model).segments((torch.randn(2, 8),))
        assert layer.rng.random() == HostRandom(how).rng.random()


class Assigning(nn.Module):
    """A forward that assigns: a running mean buffer given a new tensor (``ema``), a call counter (``counter``), a
    buffer given another shape (``grown``), or a shift set afresh from the input's size at each call, as Hugging
    Face's Swin sets its own (``resized``); and the cases a review found (below)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.linear, self.how, self.calls, self.shift = nn.Linear(8, 8), how, 0, 2
        self.register_buffer("ema", torch.zeros(8))
        self.state: torch.Tensor | None = None
        self.cache: dict[str, object] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "carried":  # a state kept for the next call, as a stateful RNN keeps its hidden state
            out = self.linear(x) if self.state is None else self.linear(x) + self.state
            self.state = out.detach()
            return out
        if self.how == "carried_pairs":  # one kept per layer as a list of pairs (RWKV's, an LSTM stack's (h, c))
            out = self.linear(x) if self.state is None else self.linear(x) + self.state[0][0] - self.state[0][1]
            self.state = [(out.detach(), out.detach() / 2)]
            return out
        if self.how == "carried_in_dict":  # a state written into a dict the module keeps
            pair = self.cache.get("hc")
            out = self.linear(x) if pair is None else self.linear(x) + pair[0] - pair[1]
            self.cache["hc"] = (out.detach(), out.detach() / 2)
            return out
        if self.how == "kept_in_dict":  # features stored for the step in a dict (a forward hook's would be alike)
            out = self.linear(x)
            self.cache["mid"] = out
            return out
        if self.how == "kept_list":  # auxiliary losses per layer, kept for the step
            out = self.linear(x)
            self.kept = [out.pow(2).mean(), {"entropy": out.softmax(-1).mean()}]
            return out
        if self.how == "ema":
            self.ema = 0.9 * self.ema + 0.1 * x.mean(0).detach()
            return self.linear(x) - self.ema
        if self.how == "ema_used_after":  # the old value, through a name taken before the assignment
            before = self.ema
            self.ema = 0.9 * before + 0.1 * x.mean(0).detach()
            return self.linear(x) - before
        if self.how == "first_call":  # a data-dependent initialization (ActNorm's)
            if not getattr(self, "initialized", False):
                self.ema.copy_(x.mean(0).detach())
                self.initialized = True
            return self.linear(x) - self.ema
        if self.how == "lazy_counter":
            self.steps = getattr(self, "steps", 0) + 1
            return self.linear(x) * min(self.steps, 3)
        if self.how == "table":  # a table filled on the first call, in a buffer registered empty
            if self.ema.numel() == 0:
                self.ema = torch.arange(2 * 8.0).reshape(2, 8) / 16
            return self.linear(x) + self.ema[: x.shape[0]]
        if self.how == "hooks_installed":  # first-call work that computes nothing (Hugging Face's output hooks)
            if not getattr(self, "installed", False):
                self.installed = True
            return self.linear(x)
        if self.how == "busy":  # set and put back within the call
            self.busy = True
            out = self.linear(x)
            self.busy = False
            return out
        if self.how == "kept":  # an output kept for an auxiliary loss or to log (attention maps)
            out = self.linear(x)
            self.kept = out.softmax(-1)
            return out
        if self.how == "counter":
            self.calls += 1
            return self.linear(x) * min(self.calls, 3)
        if self.how == "grown":
            self.ema = torch.cat([self.ema, x.mean(0).detach()])
            return self.linear(x)
        self.shift = 0 if x.shape[-1] <= 8 else 2
        return self.linear(x).roll(self.shift, -1)


@pytest.mark.parametrize("how", ["ema", "ema_used_after"])
def test_a_buffer_given_a_new_tensor_in_forward_is_updated_at_every_step(how: str) -> None:
    """torch's export keeps a buffer assignment of the root module only: a submodule's was dropped, so the buffer
    kept its first value at every step, silently. The new value is copied into the buffer once the module's forward
    returns, as on one device; until then the new value is the buffer's, and a name taken before the assignment
    still holds the old one (copied into at once, that name saw the new value: review)."""
    torch.manual_seed(0)
    model = Blocks(Assigning(how))
    reference = copy.deepcopy(model)
    splitter = Splitter(model)
    for step in range(3):
        x = torch.randn(2, 8)
        torch.testing.assert_close(splitter.run(x), reference(x), rtol=0, atol=0, msg=f"step {step}")
    torch.testing.assert_close(model.blocks[1].ema, reference.blocks[1].ema, rtol=0, atol=0)
    assert model.blocks[1].ema.abs().sum() > 0


def test_a_value_set_afresh_at_each_call_is_captured_and_a_counter_or_a_grown_buffer_is_refused() -> None:
    """A plain attribute the forward changes: the graph keeps what it computed from the value at capture, so a call
    counter would stay at its first value, silently; refused, with the place, where the graph depends on it (run
    again from the values the first run set, the graph is another). One the forward sets from its inputs at each call
    (Swin's shift) gives the same graph when run again from its own value: captured, and exact. A buffer
    given a tensor of another shape cannot be copied into: refused. The attributes are as before the capture."""
    torch.manual_seed(0)
    model = Blocks(Assigning("resized"))
    x = torch.randn(2, 8)
    torch.testing.assert_close(Splitter(model).run(x), copy.deepcopy(model)(x), rtol=0, atol=0)
    assert model.blocks[1].shift == 2
    counted = Blocks(Assigning("counter"))
    with pytest.raises(CaptureError, match=r"'blocks\.1\.calls' \(0 -> 1\) in module 'blocks\.1' \(Assigning\.forward"):
        Splitter(counted).segments((x,))
    assert counted.blocks[1].calls == 0
    with pytest.raises(CaptureError, match=r"buffer 'blocks\.1\.ema' assigned \(16,\) torch\.float32 in place of \(8,\)"):
        Splitter(Blocks(Assigning("grown"))).segments((x,))
    # found by review: a flag guarding a data-dependent initialization on the first call (the second run, from its
    # value, computes otherwise), a counter the forward creates, and a flag set and put back within the call (no
    # change: captured); a flag whose first-call work is no computation (Hugging Face installs its output hooks:
    # refused until the second run's graph was compared with the first's) is captured
    initialized = Blocks(Assigning("first_call"))
    with pytest.raises(CaptureError, match=r"'blocks\.1\.initialized' \(unset -> True\) in module 'blocks\.1'"):
        Splitter(initialized).segments((x,))
    with pytest.raises(CaptureError, match=r"'blocks\.1\.steps' \(unset -> 1\)"):
        Splitter(Blocks(Assigning("lazy_counter"))).segments((x,))
    for how in ("busy", "table", "hooks_installed"):
        model = Blocks(Assigning(how))
        if how == "table":
            model.blocks[1].ema = torch.empty(0, 8)
        torch.testing.assert_close(Splitter(model).run(x), copy.deepcopy(model)(x), rtol=0, atol=0, msg=how)


def test_a_computed_tensor_kept_as_an_attribute_is_warned_of_where_it_needs_a_gradient() -> None:
    """A training capture names the place; an evaluation capture's (no gradient: a cache, say) is not warned of, nor
    a weight that pruning or weight_norm set from its parameters in a pre-hook."""
    import warnings

    x = torch.randn(2, 8)
    for how in ("kept", "kept_list", "kept_in_dict"):
        with pytest.warns(UserWarning, match=r"keeps tensors it computes as attributes: 'blocks\.1\.(kept' in|"
                                             r"cache\['mid'\]' \(a dict).*return it from forward"):
            Splitter(Blocks(Assigning(how))).segments((x,))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*keeps tensors it computes")
        with torch.no_grad():
            Splitter(Blocks(Assigning("kept"))).segments((x,), training=False)
        pruned, normed = Blocks(Assigning("resized")), Blocks(Assigning("resized"))  # weights set in pre-hooks
        torch.nn.utils.prune.l1_unstructured(pruned.blocks[1].linear, "weight", amount=0.5)
        torch.nn.utils.weight_norm(normed.blocks[1].linear)
        for model in (pruned, normed):
            expected = model(x)
            torch.testing.assert_close(Splitter(model).run(x), expected, rtol=0, atol=1e-6)


def test_a_tensor_the_forward_reads_and_keeps_for_the_next_call_is_warned_of() -> None:
    """``self.h = h.detach()`` after reading ``self.h`` (a stateful RNN's hidden state carried from batch to batch):
    the graph neither stores it nor reads a later value, so every step ran from the state the capture found, silently
    (found by review: 6e-3 off a one-device run); the warning names the place and how to carry it through the step."""
    x = torch.randn(2, 8)
    # (kept as a list of pairs, one per layer: found by review, 0.34 off, said nothing)
    for how in ("carried", "carried_pairs", "carried_in_dict"):
        with pytest.warns(UserWarning, match=r"reads tensors it keeps as attributes and gives them new values: "
                                             r"'blocks\.1\.(state' in|cache\['hc'\]' \(a dict).*out, self\.h = "
                                             r"self\.model\(x, self\.h\)"):
            Splitter(Blocks(Assigning(how))).segments((x,))


class Reversing(nn.Module):
    """A gradient reversal written as hooks, as hook-based DANN code writes it: on an activation (``tensor``) or as a
    module's backward hook (``module``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.linear, self.how = nn.Linear(8, 8), how
        if how == "module":
            self.linear.register_full_backward_hook(lambda module, grad_in, grad_out: (-grad_in[0],))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "tensor" and x.requires_grad:
            x.register_hook(lambda grad: -grad)
        return self.linear(x)


def test_backward_hooks_inside_the_forward_are_refused_with_the_place() -> None:
    """A captured graph does not keep them: the gradients before them were the unreversed ones, silently."""
    x = torch.randn(2, 8)
    with pytest.raises(CaptureError, match=r"registers a hook on a tensor's gradient \(register_hook in module "
                                           r"'blocks\.1'.*custom torch\.autograd\.Function"):
        Splitter(Blocks(Reversing("tensor"))).segments((x,))
    with pytest.raises(CaptureError, match=r"has backward hooks on blocks\.1\.linear \(register_full_backward_hook\)"):
        Splitter(Blocks(Reversing("module"))).segments((x,))


def test_a_scripted_module_in_a_captured_model_is_refused_by_its_name() -> None:
    """It failed in set-up with torch's "register_forward_pre_hook is not supported on ScriptModules" (or a
    capture's argument count), naming nothing."""
    model = Blocks(torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.Tanh())))
    with pytest.raises(CaptureError, match=r"holds TorchScript modules \(torch\.jit\.script\) at blocks\.1: .*"
                                           r"Keep such modules unscripted"):
        Splitter(model).segments((torch.randn(2, 8),))


class Ensemble(nn.Module):
    """Heads stacked and run under torch.func.vmap (PyTorch's model-ensembling recipe: ``stack_module_state``, a
    meta-device base kept out of the module, ``functional_call``)."""

    def __init__(self) -> None:
        super().__init__()
        heads = [nn.Linear(8, 8) for _ in range(3)]
        params, _ = torch.func.stack_module_state(heads)
        self.stacked = nn.ParameterDict({name.replace(".", "_"): nn.Parameter(value) for name, value in params.items()})
        self.names = list(params)
        self.__dict__["base"] = copy.deepcopy(heads[0]).to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {name: self.stacked[name.replace(".", "_")] for name in self.names}

        def one(weights: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, weights, (h,))

        return torch.func.vmap(one, in_dims=(0, None))(params, x).mean(0)


class VmappedBlocks(nn.Module):
    """Every block run under one torch.func.vmap over the rows: no cut between blocks falls outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def row(r: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                r = torch.tanh(block(r))
            return r

        return torch.func.vmap(row)(x)


def test_an_ensemble_under_vmap_runs_in_its_segment_as_on_one_device() -> None:
    """vmap's level calls have no users in the graph, and were dropped as unread: the batched ops then failed with
    functorch's "tensor may have escaped ... internal functorch error" (found by review)."""
    torch.manual_seed(0)
    model = Blocks(Ensemble())
    reference = copy.deepcopy(model)
    x = torch.randn(4, 8)
    splitter = Splitter(model)
    assert len(splitter.segments((x,))) > 1
    out = splitter.run(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=1e-6)
    out.pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-6, atol=1e-6, msg=name)


def test_a_cut_inside_a_vmapped_function_is_refused_with_the_split_points_to_choose() -> None:
    with pytest.raises(CaptureError, match=r"the cut at blocks\.\d falls inside a function run under torch\.func\.vmap"
                                           r".*PipelineStrategy\(split_points="):
        Splitter(VmappedBlocks()).segments((torch.randn(4, 8),))


class Constrained(nn.Module):
    """Writes its weight's ``.data`` in forward: braindecode's max-norm (``how="renorm"``), PixelCNN's mask."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.linear, self.how = nn.Linear(8, 8), how
        self.register_buffer("mask", torch.ones(8, 8).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "renorm":
            self.linear.weight.data = torch.renorm(self.linear.weight.data, 2, 0, 0.5)
        else:
            self.linear.weight.data.mul_(self.mask)
        return self.linear(x)


@pytest.mark.parametrize("how", ["renorm", "mask"])
def test_a_weights_data_written_in_forward_is_refused_with_the_module_and_where_to_constrain(how: str) -> None:
    """torch's message said "code outside the model's modules" and "Please file an issue on github"."""
    with pytest.raises(CaptureError, match=r"module 'blocks\.1' writes a tensor's \.data in its forward.*"
                                           r"on_train_batch_start or on_before_optimizer_step.*Glow's ActNorm"):
        Splitter(Blocks(Constrained(how))).segments((torch.randn(2, 8),))


class Codebook(nn.Module):
    """A VQ-VAE's EMA codebook as vq-vae-2-pytorch writes it: its buffers updated through .data in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cluster_size", torch.zeros(4))
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        self.cluster_size.data.mul_(0.99).add_(out.detach()[:, :4].mean(0), alpha=0.01)
        return out


def test_a_buffers_data_written_in_forward_is_refused_saying_to_drop_data() -> None:
    """The refusal spoke of parameters and constraints alone (found by review)."""
    with pytest.raises(CaptureError, match=r"an update of its buffers \(cluster_size\) from the batch .*without "
                                           r"\.data, in place under torch\.no_grad\(\)"):
        Splitter(Blocks(Codebook())).segments((torch.randn(2, 8),))


class GaussianHead(nn.Module):
    """Returns a torch.distributions object (a DeepAR or mixture-density head)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.distributions.Normal:
        loc, scale = self.linear(x).chunk(2, -1)
        return torch.distributions.Normal(loc, nn.functional.softplus(scale))


def test_a_distribution_built_in_forward_is_refused_with_its_parameters_to_return() -> None:
    """The refusal spoke of the user's control flow on a tensor's value (torch.where, torch.cond): the control flow
    is the distribution's own argument check."""
    with pytest.raises(CaptureError, match=r"A torch\.distributions object built in forward .* return its parameters"):
        Splitter(Blocks(GaussianHead())).segments((torch.randn(2, 8),))


class GaussianLoss(nn.Module):
    """A loss from a distribution built inside forward (Hugging Face's TimeSeriesTransformer: a Student-t's
    log_prob), returned as a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        loc, scale = self.head(x).chunk(2, -1)
        return -torch.distributions.Normal(loc, nn.functional.softplus(scale)).log_prob(y).mean()


def test_a_distribution_used_inside_forward_is_captured_with_its_checks_off_as_the_refusal_says() -> None:
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    model = GaussianLoss()
    with pytest.raises(CaptureError, match=r"set_default_validate_args\(False\) before the fit"):
        Splitter(model).segments((x, y))
    checks = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        splitter = Splitter(model)
        assert len(splitter.segments((x, y))) > 1
        torch.testing.assert_close(splitter.run(x, y), model(x, y))
    finally:
        torch.distributions.Distribution.set_default_validate_args(checks)
