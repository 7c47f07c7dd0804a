"""Which path the strategy takes (the nn.Sequential fast path or a capture), the proxy that stands in for a captured
model, and the errors of the captured path: a capture failure names the module and the construct on every rank before
any rank waits for another; parameters used outside the captured model, a model the step never calls, and ranks that
capture differently are refused on every rank; a tensor a forward hook stored outside the model is an error where the
step uses it."""

from __future__ import annotations

import tempfile
import time
import types
from typing import Any

import pytest
import torch
import torch.nn as nn

from lightning_pipe.strategy.model_choice import CAPTURED, SEQUENCE, choose_model
from tests.capture_models import HAS_TRANSFORMERS, AutoEncoder, ViT
from tests.helpers import run_ranks


class Gate(nn.Module):
    """Branches on a tensor's value: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            if x.mean() > 0:  # the construct the error must name
                x = -x
        return x


def _lightning(model: nn.Module, extra: nn.Module | None = None, use: str = "model",
               head: nn.Module | None = None) -> Any:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            if extra is not None:
                self.extra = extra
            if head is not None:  # run after the model: trains
                self.head = head

            if use == "hook":  # the encoder's output kept for an auxiliary loss, as feature hooks keep them
                self.features: dict[str, torch.Tensor] = {}
                model.encoder.register_forward_hook(lambda _, __, output: self.features.__setitem__("code", output))
            if use == "kept":  # kept as an attribute (in a tuple, too) that the step never reads
                model.encoder.register_forward_hook(lambda _, __, output: setattr(self, "code", output))
                model.decoder.register_forward_hook(lambda _, __, output: setattr(self, "pair", (output, 1)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = self.extra(batch[0]) if use == "before" else batch[0]
            out = self.model(x) if use in ("model", "hook", "kept", "before", "stored") else x
            if isinstance(out, tuple):
                out = out[0]
            if head is not None:
                out = self.head(out)
            if extra is not None and use != "before":
                out = self.extra(out)
            if use == "hook":
                return out.pow(2).mean() + self.features["code"].pow(2).mean()
            if use == "stored":  # an auxiliary loss its block's forward keeps as an attribute
                return out.pow(2).mean() + self.model.second.aux
            return out.pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


# -- which path, without processes ------------------------------------------------------------------
def test_one_sequential_holding_every_trainable_parameter_takes_the_sequential_path() -> None:
    module = _lightning(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    assert choose_model(module, None) == (SEQUENCE, None)
    assert choose_model(module, "model") == (SEQUENCE, "model")
    assert choose_model(module, None, split_points=["1"]) == (CAPTURED, "model")  # hand cuts: captured


def test_other_models_are_captured_at_the_child_holding_every_trainable_parameter() -> None:
    assert choose_model(_lightning(AutoEncoder()), None) == (CAPTURED, "model")  # two Sequentials inside it
    assert choose_model(_lightning(ViT()), None) == (CAPTURED, "model")
    frozen = nn.Linear(4, 4).requires_grad_(False)  # a frozen module beside the model does not count
    assert choose_model(_lightning(ViT(), extra=frozen), None) == (CAPTURED, "model")
    assert choose_model(_lightning(ViT(), extra=nn.Linear(10, 10)), "model") == (CAPTURED, "model")


def test_layers_spread_over_attributes_are_the_modules_own_forward_when_it_has_one() -> None:
    module = _lightning(ViT(), extra=nn.Linear(10, 10))
    type(module).forward = lambda self, x: self.extra(self.model(x))
    assert choose_model(module, None) == (CAPTURED, "")


def test_trainable_parameters_spread_over_attributes_are_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"spread over \['extra', 'model'\] and it has no forward.*self.model = "):
        choose_model(_lightning(ViT(), extra=nn.Linear(10, 10)), None)
    with pytest.raises(ValueError, match=r"has no submodule 'modle'; its children are 'model' \(ViT\)"):
        choose_model(_lightning(ViT()), "modle")  # (it suggested layers='model' whatever was given: found by review)


def test_second_paths_to_a_captured_model_lead_to_this_ranks_share() -> None:
    """Another attribute holding the model leads to the proxy; one holding a module of it leads to this rank's
    holder of that module (same tensors; none where another rank holds it, as through the model's own path: a
    backbone spanning ranks is thawed and saved as one device's, each rank its share); so the LightningModule's
    state_dict holds trained weights only, under every name."""
    from lightning_pipe.strategy.captured import CapturedModule
    from lightning_pipe.strategy.pipelined_model import PipelinedModel

    vit = ViT()
    vit.generate = lambda *args, **kwargs: None  # as a Hugging Face model has
    module = _lightning(vit)
    module.again, module.head, module.embed = vit, vit.head, vit.patch_embed
    captured = CapturedModule(module, "model")
    captured.splitter.capture((torch.randn(2, 3, 16, 16),), {})
    captured.install(captured.segments[-1:])  # this rank: the last segment (norm and head)
    assert isinstance(module.model, PipelinedModel) and module.again is module.model
    assert module.embed is module.model.patch_embed and not list(module.embed.parameters())  # (another rank's)
    with pytest.raises(RuntimeError, match=r"'embed' is the module 'patch_embed' of the model at 'model', which is "
                                           r"cut into pipeline stages"):
        module.embed(torch.randn(2, 3, 16, 16))
    assert module.head is module.model.head and module.head.weight is vit.head.weight
    keys = set(module.state_dict())
    assert {"head.weight", "again.head.weight", "model.norm.weight"} <= keys
    assert not any(key.startswith(("embed.", "model.blocks.", "again.blocks.")) for key in keys)
    assert sorted(captured.aliases) == ["again", "embed", "head"]
    with pytest.raises(AttributeError, match=r"'generate' of the model at 'model' is not available.*generation .*"
                                             r"load_from_checkpoint"):
        module.model.generate
    with pytest.raises(RuntimeError, match="the model at 'model' .* cannot be scripted or exported .*"
                                           "load_from_checkpoint"):
        torch.jit.script(module.model)


class Cube(torch.autograd.Function):
    """A custom Function whose backward is its forward's exact derivative."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class Reversal(torch.autograd.Function):
    """A gradient reversal (domain-adversarial training): the identity forward, the negated gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class CubeBlocks(nn.Module):
    def __init__(self, function: type = Cube) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.function.apply(torch.tanh(block(x)))
        return x


class AuxiliaryBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.aux = nn.Linear(8, 8), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        self.aux = x.pow(2).mean()  # MoE load balancing, deep supervision
        return x


class Storing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), AuxiliaryBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


# -- errors on every rank ----------------------------------------------------------------------------
class Tempered(nn.Module):
    """Reads plain values in its forward: a temperature of its own and a scale of its second block's."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.blocks[1].scale = 1.0
        self.tau, self.calls_seen = 1.0, 0  # calls_seen: set from outside, never read by forward
        self.rounds = 1  # how many times the last block runs (a loop count)
        self.register_buffer("offset", torch.zeros(8))
        self.active = [0, 1, 2, 3]  # the blocks that run (progressive growing lists them)
        self.gain: float | None = None  # applied once set
        self.config = types.SimpleNamespace(shift=0.0, name="tempered")  # settings read as Hugging Face's are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.active:
            x = torch.tanh(self.blocks[index](x)) * (self.blocks[1].scale if index == 1 else 1.0)
        for _ in range(self.rounds - 1):
            x = torch.tanh(self.blocks[3](x))
        if self.gain is not None:
            x = x * self.gain
        return x / self.tau + self.offset + self.config.shift


def _Annealed(case: str) -> Any:
    import lightning as L

    class Annealed(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if case == "annealed_root":  # the module's own forward is the model
                self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
                self.tau = 1.0
            else:
                self.model = Tempered()
                if case in ("annealed_grown", "annealed_regrown"):
                    self.model.active = [0, 1]
                if case == "hook_removed":  # a warm-up hook, removed after the first step
                    self.handle = self.model.blocks[1].register_forward_hook(lambda module, args, out: out * 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if case != "annealed_root":
                return self.model(x)
            for block in self.blocks:
                x = torch.tanh(block(x))
            return x / self.tau

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            if case == "annealed":
                self.model.tau = 1.0 + self.global_step
            elif case == "annealed_part":
                self.model.blocks[1].scale = 1.0 / (1 + self.global_step)
            elif case == "annealed_root":
                self.tau = 1.0 + self.global_step
            elif case == "annealed_grown" and self.global_step > 0:  # a block switched on (progressive growing)
                self.model.active.append(len(self.model.active))  # in place
            elif case == "annealed_regrown" and self.global_step > 0:
                self.model.active = list(range(3))  # a new list
            elif case == "annealed_rounds":  # a loop's count, raised as training goes (found by review)
                self.model.rounds = 1 + self.global_step
            elif case == "annealed_config":  # a field of the model's settings, as Hugging Face's config holds them
                self.model.config.shift = float(self.global_step)
            elif case == "annealed_gain":  # a value the forward skips while it is None
                self.model.gain = None if self.global_step == 0 else 2.0
            elif case == "annealed_buffer":  # a buffer given a new tensor: copied into the one the graph reads
                self.model.offset = torch.full((8,), float(self.global_step))
            elif case == "hook_before_first_step" and self.global_step == 0 and not hasattr(self, "_hooked"):
                self._hooked = True  # (registered before the first step, after the capture at set-up)
                self.model.blocks[1].register_forward_hook(lambda module, args, out: out * 0.5)
            elif case == "hook_added" and self.global_step == 1:  # a hook registered after the capture
                self.model.blocks[1].register_forward_hook(lambda module, args, out: out * 0.5)
            elif case == "hook_removed" and self.global_step == 1:
                self.handle.remove()
            else:  # "annealed_unread": a value forward never reads may change
                self.model.calls_seen += 1

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Annealed()


_NEEDS_TRANSFORMERS = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")


def _run(rank: int, world_size: int, case: str) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401

    torch.manual_seed(0)
    strategy: Any = "pipedream"
    if case == "gate":
        module, width = _lightning(Gate()), 8
    elif case == "outside":  # the step computes the model's input with a trainable layer beside the model it names
        module, width = _lightning(AutoEncoder(), extra=nn.Linear(32, 32), use="before", head=nn.Linear(32, 4)), 32
        strategy = lightning_pipe.PipelineStrategy(layers="model")
    elif case == "never_called":
        module, width = _lightning(AutoEncoder(), use="none"), 32
    elif case == "hook":
        module, width = _lightning(AutoEncoder(), use="hook"), 32
    elif case == "stored":
        module, width = _lightning(Storing(), use="stored"), 8
    elif case == "appended":  # a memory bank the forward fills (anomalib's Padim: found by review)
        class Banking(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
                self.memory_bank: list[torch.Tensor] = []

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                h = torch.tanh(self.first(x))
                if self.training:
                    self.memory_bank.append(h.detach())
                return self.second(h)

        module, width = _lightning(Banking()), 8
    elif case == "thawed":  # a parameter the step reads after the model, frozen at the build, unfrozen in the step
        class Thawing(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = AutoEncoder()
                self.temperature = nn.Parameter(torch.ones(()), requires_grad=False)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                self.temperature.requires_grad_(True)
                return (self.model(batch[0])[0] / self.temperature).pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module, width = Thawing(), 32
    elif case in ("save_pretrained", "num_parameters"):  # Hugging Face's whole-model methods, from hooks
        from tests.capture_models import hf_gpt2

        class Saving(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = hf_gpt2(layers=2)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return self.model(batch[0], labels=batch[0]).loss

            def on_train_epoch_end(self) -> None:
                if case == "save_pretrained":
                    self.model.save_pretrained(tempfile.mkdtemp())
                else:
                    self.log("parameters", float(self.model.num_parameters()))

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        tokens = DataLoader([(torch.randint(0, 50, (4, 6)),) for _ in range(2)], batch_size=None)
        L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, max_epochs=1).fit(Saving(), tokens)
        return
    elif case == "graph":  # node classification on one whole graph: the batch is its nodes and their adjacency
        class Propagation(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 3)

            def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
                return self.second(adjacency @ torch.relu(self.first(adjacency @ x)))

        class Nodes(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = Propagation()

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return self.model(batch[0], batch[1]).pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        graph = DataLoader([(torch.randn(8, 4), torch.rand(8, 8)) for _ in range(2)], batch_size=None)
        L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(Nodes(), graph)
        return
    elif case == "custom_function":
        module, width = _lightning(CubeBlocks(function=Reversal)), 8
    elif case == "lazy":  # a lazy layer: no shape before its first call
        module, width = _lightning(nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())), 8
    elif case == "headed":  # a backbone and a margin head (ArcFace) the step applies to its output
        class Headed(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = AutoEncoder()
                self.head = nn.Linear(32, 4)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return self.head(self.encoder(batch[0])[0]).pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module, width = Headed(), 32
    elif case == "looped":  # a forward that runs its nn.Sequential's layers one by one, collecting features
        class Looped(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for layer in self.layers:
                    x = torch.tanh(layer(x))
                return x

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                return self(batch[0]).pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module, width = Looped(), 8
    elif case == "shared":  # ELECTRA: a generator sharing the discriminator's embeddings, run beside the pipeline
        class Discriminator(nn.Module):
            def __init__(self, embed: nn.Module) -> None:
                super().__init__()
                self.embed, self.blocks = embed, nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.embed(x)
                for block in self.blocks:
                    x = torch.tanh(block(x))
                return x

        class Generator(nn.Module):
            def __init__(self, embed: nn.Module) -> None:
                super().__init__()
                self.embed, self.head = embed, nn.Linear(8, 8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.embed(x))

        class Electra(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                embed = nn.Linear(8, 8)
                self.discriminator, self.generator = Discriminator(embed), Generator(embed)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                replaced = self.generator(batch[0])
                return self.discriminator(replaced.detach()).pow(2).mean() + replaced.pow(2).mean()

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module, width = Electra(), 8
        strategy = lightning_pipe.PipelineStrategy(layers="discriminator")
    elif case == "one_piece":  # one layer, nothing to cut before: one piece for two stages
        class OnePiece(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(8, 8)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.tanh(self.linear(x)).pow(2)

        module, width = _lightning(OnePiece()), 8
    elif case.startswith("annealed"):  # a plain value the forward reads, changed by a hook (a temperature schedule)
        module, width = _Annealed(case), 8
        strategy = lightning_pipe.PipelineStrategy(layers="" if case == "annealed_root" else None)
    elif case.startswith("hook_"):  # hooks added or removed after the capture (found by review: 0.87, 0.45 off)
        module, width = _Annealed(case), 8
    else:
        raise ValueError(case)
    data = DataLoader([(torch.randn(8, width),) for _ in range(2)], batch_size=None)
    L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(module, data)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("case", "expected"), [
    ("gate", ["CaptureError", "Gate", "x.mean() > 0", "torch.where"]),
    ("outside", ["computes the input of the model at 'model' (AutoEncoder) with parameters outside it", "extra.weight",
                 "requires_grad_(False)"]),
    ("never_called", ["never called the model at 'model'", "layers="]),
    ("hook", ["Module.features['code'] was stored while the model at 'model' (AutoEncoder) was captured",
              "Return what the step needs from the model's forward"]),
    ("graph", ["CaptureError", "The batch holds a tensor of shape (8, 8) over its 8 rows twice",
               "pass num_microbatches=1"]),
    ("appended", ["CaptureError", "Banking.forward appends tensors to lists it keeps as attributes: 'memory_bank'",
                  "fit it on one device (drop the strategy)"]),
    ("stored", ["'aux' of 'second' is a tensor that its forward stores at each call",
                "Return it from the model's forward"]),
    ("thawed", ["gave gradients to temperature, outside the pipelined model and frozen when the pipeline was built",
                "set requires_grad before trainer.fit"]),
    ("custom_function", ["CaptureError", "Reversal", "backward differs from its forward's derivative",
                         "PipelineStrategy(allow_autograd_functions=True)"]),
    ("lazy", ["lazy layers whose weights have no shape yet: ['model.0']", "model(example_input)"]),
    ("headed", ["cannot tell which model of Headed to pipeline", "PipelineStrategy(layers='encoder')",
                "parameters the step uses before calling it, a condition's embedding"]),
    ("looped", ["of the nn.Sequential at 'layers', which another pipeline stage holds",
                "runs the sequence's layers one by one", "pass PipelineStrategy(layers='')"]),
    ("shared", ["'generator.embed' is the module 'embed' of the", "self.generator.embed: ELECTRA's generator",
                "call both models from the LightningModule's forward and self(...) in the step"]),
    # (it was told to name split points, which cannot cut one Linear: found by review with Lightning's BoringModel)
    ("one_piece", ["cannot cut 1 layer into 2 stages", "the model at 'model' (OnePiece) is a single layer",
                   "Train it on one device"]),
    ("annealed", ["Tempered.forward reads plain attributes (Python numbers, flags, None, lists of them, tensors "
                  "that are not buffers) that changed after it was captured",
                  "tau (1.0 at its capture, now 2.0)", "self.register_buffer("]),
    ("annealed_part", ["blocks.1.scale (1.0 at its capture, now 0.5)", "pass it to forward as a tensor"]),
    ("annealed_root", ["Annealed.forward reads plain attributes", "tau (1.0 at its capture, now 2.0)"]),
    ("annealed_grown", ["active ([0, 1] at its capture, now [0, 1, 2])", "progressive growing"]),
    ("annealed_regrown", ["active ([0, 1] at its capture, now [0, 1, 2])"]),
    ("annealed_gain", ["gain (None at its capture, now 2.0)"]),
    ("annealed_rounds", ["rounds (1 at its capture, now 2)", "loop to the largest count and let a buffer gate each"]),
    ("hook_added", ["hooks of yours were added to blocks.1 of Tempered after it was captured", "in __init__"]),
    ("hook_removed", ["hooks of yours were removed from blocks.1 of Tempered after it was captured"]),
    ("hook_before_first_step", ["hooks of yours were added to blocks.1 of Tempered after it was captured (when the "
                                "Trainer set the strategy up, before on_fit_start)"]),
    pytest.param("save_pretrained", ["GPT2LMHeadModel.save_pretrained(...) under PipelineStrategy would write this "
                                     "rank's share", "trainer.save_checkpoint(path)"], marks=_NEEDS_TRANSFORMERS),
    pytest.param("num_parameters", ["GPT2LMHeadModel.num_parameters() under PipelineStrategy would count this rank's "
                                    "share", "count it before the fit"], marks=_NEEDS_TRANSFORMERS),
])
def test_errors_of_the_captured_path_end_every_rank(case: str, expected: list[str]) -> None:
    start = time.monotonic()
    errors = run_ranks(_run, 2, case, timeout=200, expect_failure=True)
    for rank, text in enumerate(errors):
        assert text is not None, f"rank {rank} finished"
        for part in expected:
            assert part in text, f"rank {rank}: {part!r} not in:\n{text[-3000:]}"
        # the head the step runs after the model trains: not named among what to freeze (found by review)
        assert case != "outside" or "head.weight" not in text, text[-3000:]
        assert case != "annealed" or "loop to the largest count" not in text, text[-3000:]  # a float, no count
    assert time.monotonic() - start < 200


@pytest.mark.timeout(120)
def test_a_plain_value_the_captured_forward_never_reads_may_change() -> None:
    run_ranks(_run, 2, "annealed_unread", timeout=100)  # a step counter kept on the model, set by a hook


def _config_changed(rank: int, world_size: int) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(rank, world_size, "annealed_config")
    return [str(w.message) for w in caught if "fields of a config object" in str(w.message)]


@pytest.mark.timeout(120)
def test_a_field_of_a_config_the_captured_forward_reads_changed_after_the_capture_is_warned_of() -> None:
    """``self.config.shift`` changed by a hook was ignored by the graph, silently (weights 0.17 off)."""
    for warned in run_ranks(_config_changed, 2, timeout=100):
        assert len(warned) == 1 and "config.shift (0.0 at its capture, now 1.0)" in warned[0], warned


def _buffer_given(rank: int, world_size: int) -> tuple[list[float], list[float]]:
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = _Annealed("annealed_buffer")
    data = DataLoader([(torch.randn(8, 8),) for _ in range(3)], batch_size=None)
    devices, strategy = (world_size, "pipedream") if world_size > 1 else (1, "auto")
    L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=3).fit(module, data)
    weights = module.state_dict()
    return [float(weights[name].sum()) for name in sorted(weights) if "blocks" in name], module.model.offset.tolist()


@pytest.mark.timeout(120)
def test_a_buffer_given_a_new_tensor_from_outside_the_forward_trains_as_on_one_device() -> None:
    """The new tensor is copied into the buffer the captured graphs read (each rank holds it whole)."""
    ranks = run_ranks(_buffer_given, 2, timeout=100)
    one_weights, one_offset = _buffer_given(0, 1)
    assert ranks[0][1] == ranks[1][1] == one_offset == [2.0] * 8
    held = sorted(ranks[0][0] + ranks[1][0])
    assert len(held) == len(one_weights) and all(abs(a - b) < 1e-5 for a, b in zip(held, sorted(one_weights)))


def _towers(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401

    class Towers(L.LightningModule):
        """CLIP's logit scale on the module, which the step applies and its forward (two towers) does not read."""

        def __init__(self) -> None:
            super().__init__()
            self.image, self.text = nn.Linear(8, 4), nn.Linear(8, 4)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.image(x), self.text(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            image, text = self(batch[0])
            return (self.scale.exp() * image @ text.T).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    module = Towers()
    data = DataLoader([(torch.randn(8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)],
                      batch_size=None)
    L.Trainer(strategy=lightning_pipe.PipelineStrategy(num_microbatches=1) if world_size > 1 else "auto",
              accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(module, data)
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.timeout(240)
def test_a_scale_on_the_module_that_the_step_applies_after_its_forward_trains_as_on_one_device() -> None:
    """Once refused (before that: an AttributeError on the last stage): every rank holds the scale; its gradient is
    the last stage's. One micro-batch: the loss compares every row with every other."""
    reference = _towers(0, 1)
    assert not torch.equal(reference["scale"], torch.ones(()))
    for held in run_ranks(_towers, 2, timeout=200):
        torch.testing.assert_close(held["scale"], reference["scale"], rtol=1e-5, atol=1e-6)
        for name, tensor in held.items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def _frozen_scale(rank: int, world_size: int) -> list[float]:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401

    class Towers(L.LightningModule):
        """A frozen scale on the module that the step applies and its forward (two towers) does not read, the whole
        built in configure_model (on meta under the strategy)."""

        def configure_model(self) -> None:
            self.image, self.text = nn.Linear(8, 4), nn.Linear(8, 4)
            self.scale = nn.Parameter(torch.full((), 2.0), requires_grad=False)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.image(x), self.text(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            image, text = self(batch[0])
            self.seen.append(float(self.scale))
            return (self.scale * image * text).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    module = Towers()
    module.seen = []
    data = DataLoader([(torch.randn(8, 8),) for _ in range(2)], batch_size=None)
    L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(module, data)
    return [float(module.scale), *module.seen]


@pytest.mark.timeout(200)
def test_a_frozen_parameter_of_the_module_that_only_the_step_reads_is_on_every_rank() -> None:
    """Before: only the rank whose stage took it held it (an AttributeError in the step elsewhere), and built on meta
    no other rank materialized it (a meta tensor at the move to the device)."""
    for values in run_ranks(_frozen_scale, 2, timeout=160):
        assert values and all(value == 2.0 for value in values), values


def _kept(rank: int, world_size: int) -> list[str]:
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = _lightning(AutoEncoder(), use="kept")
    data = DataLoader([(torch.randn(8, 32),) for _ in range(2)], batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(module, data)
    return [str(w.message) for w in caught if "stored tensors" in str(w.message)]


@pytest.mark.timeout(120)
def test_tensors_a_hook_stores_that_the_step_never_reads_are_warned_of_and_train() -> None:
    for warned in run_ranks(_kept, 2, timeout=100):
        assert len(warned) == 1 and "Module.code, Module.pair[0]" in warned[0], warned


def _checked(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe

    torch.manual_seed(0)
    module = _lightning(CubeBlocks())
    data = DataLoader([(torch.randn(8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)],
                      batch_size=None)
    L.Trainer(strategy=lightning_pipe.PipelineStrategy(), accelerator="cpu", devices=world_size, logger=False,
              enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
              max_steps=2).fit(module, data)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.timeout(120)
def test_autograd_functions_whose_backward_is_the_derivative_train_like_one_device() -> None:
    """A custom Function whose backward is its forward's exact derivative is checked so at the capture and trains
    as on one device, with no flag (``allow_autograd_functions=True`` used to be needed)."""
    results = run_ranks(_checked, 2, timeout=100)
    torch.manual_seed(0)
    module = _lightning(CubeBlocks())
    optimizer = module.configure_optimizers()
    for i in range(2):
        optimizer.zero_grad()
        module.training_step((torch.randn(8, 8, generator=torch.Generator().manual_seed(i)),), i).backward()
        optimizer.step()
    got = {**results[0], **results[1]}
    for key, value in module.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _differently(rank: int, world_size: int) -> None:
    """Rank 1 builds a wider model: its capture differs, and every rank says so before a step runs."""
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401

    module = _lightning(AutoEncoder(hidden=16 if rank == 0 else 24))
    data = DataLoader([(torch.randn(8, 32),) for _ in range(2)], batch_size=None)
    L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=1).fit(module, data)


@pytest.mark.timeout(120)
def test_ranks_that_capture_differently_are_refused_on_every_rank() -> None:
    errors = run_ranks(_differently, 2, timeout=100, expect_failure=True)
    for rank, text in enumerate(errors):
        assert text is not None and "captured AutoEncoder differently" in text, f"rank {rank}:\n{(text or '')[-2000:]}"


def test_the_adjacency_hint_comes_only_with_a_size_error_over_a_square_tensor_of_values() -> None:
    from lightning_pipe.strategy.cutting import _rows_by_rows

    nodes, adjacency = torch.randn(8, 4), torch.rand(8, 8)
    sizes = "a and b must have same reduction dim, but got [s17, s20] X [s77, s27]"
    assert "over its 8 rows twice" in _rows_by_rows((nodes, adjacency), 4, sizes)
    # padded CTC targets or token ids as long as the batch has rows are no adjacency; nor is another error about one
    assert _rows_by_rows((nodes, torch.ones(8, 8, dtype=torch.long)), 4, sizes) is None
    assert _rows_by_rows((nodes, adjacency), 4, "pack_padded_sequence cannot be captured") is None
    assert _rows_by_rows((nodes, adjacency), 1, sizes) is None


def test_hugging_face_embedding_getters_reach_this_ranks_share_or_say_where_it_is() -> None:
    """``self.model.get_input_embeddings()`` (new-token training masks rows of its gradient) used to fail with
    transformers' "not auto-handled for PipelinedModel; please override in the subclass": its ``base_model`` property
    was refused on the stand-in. It runs there now: the rank holding the embedding gets its weight, another rank an
    error saying the weight is held elsewhere and how a gradient hook reaches what each rank holds."""
    from tests.capture_models import HAS_TRANSFORMERS

    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install -e '.[dev]')")
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_pipe.strategy.captured import CapturedModule

    for held in ("first", "last"):
        gpt = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                         tie_word_embeddings=False))
        module = _lightning(gpt)
        captured = CapturedModule(module, "model")
        captured.splitter.capture((torch.randint(0, 40, (2, 8)),), {})
        captured.install(captured.segments[:1] if held == "first" else captured.segments[-1:])
        embedding = module.model.get_input_embeddings()
        assert isinstance(embedding, nn.Embedding)
        if held == "first":
            assert embedding.weight is gpt.transformer.wte.weight
        else:
            with pytest.raises(AttributeError, match=r"'weight' of 'transformer.wte' is held by another rank.*"
                                                     r"self.named_parameters\(\)"):
                embedding.weight
            assert module.model.get_output_embeddings().weight is gpt.lm_head.weight


def test_a_whole_models_state_dict_loads_into_the_stand_in_as_this_ranks_share() -> None:
    """``self.model.load_state_dict(torch.load(pretrained))`` in ``on_fit_start``, after the cut: torch's "Unexpected
    key(s) in state_dict for PipelinedModel" before (every other rank's keys); now this rank's share loads, and a
    state dict of another model is refused alike on every rank."""
    from lightning_pipe.strategy.captured import CapturedModule

    vit = ViT()
    pretrained = {key: torch.full_like(value, 0.5) for key, value in ViT().state_dict().items()}
    module = _lightning(vit)
    captured = CapturedModule(module, "model")
    captured.splitter.capture((torch.randn(2, 3, 16, 16),), {})
    captured.install(captured.segments[-1:])  # this rank: the last segment (norm and head)
    module.model.load_state_dict(pretrained)
    assert torch.equal(module.model.head.weight, pretrained["head.weight"])
    with pytest.raises(RuntimeError, match=r"does not match ViT: missing keys \['head.bias'\], unexpected keys "
                                           r"\['head.bias_typo'\]"):
        module.model.load_state_dict({**{k: v for k, v in pretrained.items() if k != "head.bias"},
                                      "head.bias_typo": pretrained["head.bias"]})


def _peft_reference(rank: int, world_size: int) -> None:
    """LoRA on a tiny Llama whose step takes a reference model's logits with the adapters off, as DPO and KL-to-base
    fine-tuning do with PEFT."""
    import lightning as L
    import peft
    import transformers

    torch.set_num_threads(1)

    class Referenced(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
            self.model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            logits = self.model(input_ids=batch).logits
            with torch.no_grad(), self.model.disable_adapter():
                reference = self.model(input_ids=batch).logits
            return (logits - reference).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)

    data = torch.utils.data.DataLoader(torch.randint(0, 64, (8, 8)), batch_size=4)
    L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, max_steps=2).fit(Referenced(), data)


@pytest.mark.timeout(180)
def test_peft_adapters_switched_off_in_the_step_are_refused_with_the_ways_that_work() -> None:
    pytest.importorskip("peft")
    for text in run_ranks(_peft_reference, 2, timeout=160, expect_failure=True):
        assert text is not None and "PEFT's disable_adapter() and set_adapter() switch the adapters" in text, text
        assert "precompute_ref_log_probs" in text and "frozen copy of the base model" in text


class _Prototypes(nn.Module):
    """lightly's SwaVPrototypes' way: heads whose weights a method normalizes in place, every few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(8, 5, bias=False)])
        self.register_buffer("eps", torch.tensor(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[0](x)

    def normalize(self) -> None:
        for layer in self.heads:
            with torch.no_grad():  # (a buffer beside the weight: found by review, refused where the weight is not)
                layer.weight.div_(torch.norm(layer.weight, dim=1, keepdim=True) + self.eps)

    def norms(self) -> torch.Tensor:
        return self.heads[0].weight.norm(dim=1)


class _SwAV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.prototypes = _Prototypes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(nn.functional.normalize(self.backbone(x), dim=1))


def test_a_method_changing_its_modules_parameters_in_a_hook_runs_where_they_are_held() -> None:
    """lightly's ``prototypes.normalize()`` in ``on_train_batch_start`` was refused on every rank (found by review),
    also on the rank holding every prototype. It runs there on the weights, and on a rank holding none of them on
    stand-ins without values (the holder changes them); a value computed from those is refused, as is reading the
    weight outside such a method."""
    from lightning_pipe.strategy.captured import CapturedModule

    for held in ("first", "last"):
        model = _SwAV()
        module = _lightning(model)
        captured = CapturedModule(module, "model", split_points=["prototypes"])
        captured.splitter.capture((torch.randn(4, 6),), {})
        captured.install(captured.segments[:1] if held == "first" else captured.segments[-1:])
        weight = model.prototypes.heads[0].weight
        before = weight.detach().clone()
        module.model.prototypes.normalize()
        if held == "last":
            torch.testing.assert_close(weight.norm(dim=1), torch.ones(5))
            torch.testing.assert_close(module.model.prototypes.norms(), torch.ones(5))
            continue
        assert weight.is_meta or torch.equal(weight, before)  # (the whole model's, not this rank's: untouched)
        with pytest.raises(RuntimeError, match=r"'weight' of 'prototypes.heads.0' is held by another rank"):
            module.model.prototypes.norms()
        with pytest.raises(AttributeError, match=r"'weight' of 'prototypes.heads.0' is held by another rank"):
            module.model.prototypes.heads[0].weight


def test_pruning_a_captured_model_again_during_the_fit_is_refused_naming_pruning() -> None:
    """Iterative pruning in a hook (prune.l1_unstructured again on a layer pruned in __init__) was refused with "read
    plain attributes", and "holds only its share" on the rank holding the layer (found by review)."""
    from torch.nn.utils import prune

    from lightning_pipe.strategy.captured import CapturedModule

    model = _SwAV()
    prune.l1_unstructured(model.backbone[0], "weight", amount=0.5)
    module = _lightning(model)
    captured = CapturedModule(module, "model", split_points=["prototypes"])
    captured.splitter.capture((torch.randn(4, 6),), {})
    captured.install(captured.segments[:1])  # this rank: the backbone, pruned
    with pytest.raises(AttributeError, match=r"holds all the parameters of 'backbone.0'.*a pruned weight.*Prune "
                                             r"before the fit"):
        prune.l1_unstructured(module.model.backbone[0], "weight", amount=0.3)
