"""Capture errors that name the module and the line that failed, and say what to change."""

from __future__ import annotations

import os
import re
import sys
import traceback
from types import FrameType
from typing import Any

import torch.nn as nn
import torch.nn.modules.module

__all__ = ["CaptureError", "module_names", "locate_exception", "locate_frame", "explain_export_error", "listed"]

_MODULE_FILE = os.path.abspath(torch.nn.modules.module.__file__)  # where torch calls a module: hooks, then forward
# code that is not the user's model: torch's, this package's, Python's own
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (
    torch.__file__, os.path.dirname(os.path.abspath(__file__)), os.__file__))


def _library_code(filename: str) -> bool:
    path = os.path.abspath(filename)
    return filename.startswith("<") or path.startswith(_LIBRARY_DIRS[:2]) or (
        path.startswith(_LIBRARY_DIRS[2]) and "-packages" + os.sep not in path)

SEQUENTIAL_PATH = ("or keep the layers to pipeline in one nn.Sequential, which the strategy cuts without capturing "
                   "the forward")


class CaptureError(RuntimeError):
    """The model's forward cannot be captured or cut as asked; the message says where and what to change."""


def module_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> name`` for every module of ``model`` (``""`` for the model itself)."""
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def listed(places: list[str]) -> str:
    """The first of ``places`` and how many more there are (``"module 'a' (...) and 2 more"``)."""
    return places[0] + (f" and {len(places) - 1} more" if len(places) > 1 else "")


def _describe(name: str, module: Any, function: str, filename: str, line: int, source: str | None) -> str:
    where = f"module {name!r}" if name else "the model itself"
    text = f"{where} ({type(module).__name__}.{function} at {filename}:{line}"
    return text + (f": `{source.strip()}`)" if source else ")")


def _bound(frame: FrameType) -> Any:
    """The object a frame's method runs on: its ``self``, or a first argument under another name whose class defines
    the frame's function (``def forward(this, x)``; not a function given a module, as ``checkpoint(block, x)``)."""
    code = frame.f_code
    if not code.co_argcount:
        return None
    first = frame.f_locals.get(code.co_varnames[0])
    if first is None or code.co_varnames[0] == "self":
        return first
    for klass in type(first).__mro__:
        if getattr(klass.__dict__.get(code.co_name), "__code__", None) is code:
            return first
    return None


def locate_frame(frame: FrameType | None, names: dict[int, str]) -> str:
    """The innermost of the model's modules running on the Python stack, from ``frame`` outwards."""
    while frame is not None:
        obj = _bound(frame)
        if obj is not None and id(obj) in names:
            lines = traceback.extract_stack(frame, limit=1)
            source = lines[0].line if lines else None
            return _describe(names[id(obj)], obj, frame.f_code.co_name, frame.f_code.co_filename, frame.f_lineno,
                             source)
        frame = frame.f_back
    return "code outside the model's modules"


def locate_exception(error: BaseException, names: dict[int, str]) -> str:
    """The innermost frame of one of the model's modules in ``error``'s traceback, or in the errors it came from
    (export re-raises from deep inside torch; the user's line is in a cause's traceback)."""
    found, dispatch, seen, outside = None, None, set(), None
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            obj = _bound(tb.tb_frame)
            if not _library_code(tb.tb_frame.f_code.co_filename):
                outside = traceback.extract_tb(tb, limit=1)[0]  # (the innermost frame of code not torch's nor ours)
            if obj is not None and id(obj) in names:
                summary = traceback.extract_tb(tb, limit=1)[0]
                place = (names[id(obj)], obj, tb.tb_frame.f_code.co_name, summary.filename, summary.lineno,
                         summary.line)
                if os.path.abspath(summary.filename) == _MODULE_FILE:
                    dispatch = place  # torch's call of a module (hooks, forward): the user's line is elsewhere
                else:
                    found = place
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    found = found or dispatch
    if found:
        described = _describe(*found)
        if outside is not None and outside.filename != found[3] \
                and re.search(r"[/\\](site|dist)-packages[/\\](?!sympy[/\\])", outside.filename):  # (not torch's
            # symbolic shapes' sympy: a library's code the model calls, torchdiffeq's check of its time points,
            # found by review)
            described += f", in {outside.filename}:{outside.lineno}" + (
                f": `{outside.line.strip()}`" if outside.line else "")
        return described
    if outside is not None:  # (a frame the names do not tell, found by review: TFT's int(encoder_lengths.max()))
        return f"code at {outside.filename}:{outside.lineno}" + (f": `{outside.line.strip()}`" if outside.line else "")
    return "code outside the model's modules"


def explain_export_error(error: BaseException, model: nn.Module, training: bool, names: dict[int, str]) -> CaptureError:
    """A :class:`CaptureError` for an exception of ``torch.export``: where it happened and what to do about it."""
    text = str(error).strip()
    first = _first_sentences(text.splitlines()[0]) if text else type(error).__name__
    where = locate_exception(error, names)
    mode = "train" if training else "eval"
    lifted = re.search(r"fake tensor in the exported program constant's list.*?model attribute: ([\w.]+?)\.?"
                       r"lifted_tensor", text, re.S)
    if lifted is not None:  # a parameter's .data written in forward: torch's own message asks for an issue
        owner = lifted.group(1).rstrip(".") or type(model).__name__
        try:
            part = model.get_submodule(owner) if owner != type(model).__name__ else model
        except AttributeError:
            part = model
        buffers = [name for name, buffer in part.named_buffers(recurse=False) if buffer.is_floating_point()]
        fixes = [
            "a constraint on its parameters (a max-norm `self.weight.data = torch.renorm(...)`, a masked "
            "convolution's `self.weight.data.mul_(self.mask)`): apply it outside the forward, once per step, where "
            "every rank applies it to the parameters it holds (on_train_batch_start or on_before_optimizer_step over "
            "self.named_parameters() under torch.no_grad()), or compute the constrained weight in forward without "
            "writing it (torch.nn.utils.parametrize, F.linear(x, self.weight * self.mask))",
            "a data-dependent initialization on the first call (Glow's ActNorm: `self.loc.data.copy_(-x.mean(0))`): "
            "initialize such layers before trainer.fit, on a whole batch (model(batch) once), with the flag a plain "
            "Python attribute (`self.initialized = True`), not a buffer"]
        if buffers:  # (an EMA codebook's: found by review, given the parameters' advice alone)
            fixes.insert(1, f"an update of its buffers ({', '.join(buffers[:4])}) from the batch (a VQ-VAE's EMA "
                            f"codebook: `self.cluster_size.data.mul_(decay)`): update them without .data, in place "
                            f"under torch.no_grad() (`self.cluster_size.mul_(decay).add_(...)`), which the pipeline "
                            f"follows (once per micro-batch, said by a warning; num_microbatches=1 matches one device)")
        return CaptureError(
            f"cannot capture {type(model).__name__}.forward ({mode} mode): module {owner!r} writes a tensor's .data in "
            f"its forward, which a captured graph cannot keep. Where that is " + "; where it is ".join(fixes) +
            f"; {SEQUENTIAL_PATH}")
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ is not None else []
    if any(f"{os.sep}distributions{os.sep}" in frame.filename for frame in frames):  # not the user's control flow
        advice = ("A torch.distributions object built in forward checks its arguments' values (validate_args), "
                  "which a captured graph cannot: where forward uses it inside (a loss from its log_prob, as Hugging "
                  "Face's TimeSeriesTransformer, Informer and Autoformer do), call torch.distributions.Distribution."
                  "set_default_validate_args(False) before the fit; where forward returns it, which a graph cannot, "
                  "return its parameters as tensors (loc and scale, logits) and build the distribution in the step "
                  f"from the model's output; {SEQUENTIAL_PATH}.")
    else:
        advice = _advice(error, text, where)
    return CaptureError(f"cannot capture {type(model).__name__}.forward ({mode} mode): {type(error).__name__} in "
                        f"{where}: {first}. {advice}")


def _first_sentences(line: str, limit: int = 400) -> str:
    """``line``, or its sentences that fit in ``limit`` characters (torch's hints end sentences: "To register a custom
    dataclass, use torch.export.register_dataclass."), without the last full stop."""
    if len(line) <= limit:
        return line.removesuffix(".")
    end = line.rfind(". ", 0, limit)
    return line[:end] if end > 0 else line[:limit] + "..."


def _distribution_named(text: str) -> bool:
    """Whether ``text`` names a class of torch.distributions' (a subclass too: zuko's NormalizingFlow) as the type
    a graph's output cannot hold (found by review: told to register it as a pytree, which leaves log_prob outside)."""
    for found in re.finditer(r"<class '([\w.]+)\.(\w+)'>", text):
        module, name = found.groups()
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and issubclass(kind, torch.distributions.Distribution):
            return True
    return False


def _advice(error: BaseException, text: str, where: str = "") -> str:
    name = type(error).__name__
    if "Cache" in text and ("not a known type" in text or "pytree" in text):
        return ("A key/value cache cannot cross pipeline stages: pass use_cache=False to the model (or set "
                "model.config.use_cache = False).")
    if ("not a known type" in text or "register a pytree" in text) and _distribution_named(text):
        return ("A probability distribution (a normalizing flow's, zuko's flow()) cannot leave a pipeline's graph: "
                "its log_prob and sample run after the model, outside the stages. Have forward return the values "
                "the loss needs, each row's (a module whose forward returns self.flow().log_prob(x)); sample on one "
                "device from a checkpoint.")
    if "not a known type" in text or "register a pytree" in text:
        return ("Return tensors, tuples, lists, dicts, dataclasses or ModelOutputs from forward, or register the "
                "type with torch.utils._pytree.register_pytree_node.")
    if "generator=" in where or "torch._C.Generator" in text:
        return ("A draw from a torch.Generator the model keeps (torch.rand(..., generator=self.g)) cannot be captured: "
                "the graph takes no generator. Draw from torch's global generator instead (drop generator=): the "
                "pipeline forks it for each micro-batch from a seed every rank shares, and a checkpoint keeps it.")
    if "torch/nn/modules/rnn.py" in where and ("FakeTensor" in text or "data-dependent" in text):
        return ("An RNN given a PackedSequence (pack_padded_sequence) takes its batch sizes from the lengths' values, "
                "which cannot be captured. A one-directional RNN can take the padded batch (batch_first as before): "
                "its outputs at the valid steps are the same, so pick each row's last valid step with the lengths "
                "(`out[torch.arange(len(out)), lengths - 1]`, not h_n) or mask the steps past them. A bidirectional "
                "one cannot (its reverse direction would start in the padding): give it batches whose sequences have "
                "one length each, with a batch sampler that groups the dataset by length, and no packing.")
    if "torch/nn/modules/batchnorm.py" in where and "num_batches_tracked" in where:
        return ("A batch norm with momentum=None (a cumulative average of the batches' statistics, weighted by "
                "1 / num_batches_tracked) reads its step count's value, which a captured graph cannot: give it a "
                f"momentum (the default 0.1), {SEQUENTIAL_PATH}, whose batch norms run as modules.")
    if "observer_enabled" in where or "fake_quant_enabled" in where:
        return ("Quantization-aware training's FakeQuantize switches its observer and its rounding on the values of "
                "its flags (observer_enabled, fake_quant_enabled), which a captured graph cannot follow: train such "
                f"a model on one device or with DDP, {SEQUENTIAL_PATH}, whose layers run as modules.")
    if re.search(r"torchdiffeq[/\\]", where):  # (found by review)
        return ("torchdiffeq's odeint checks its time points' values (that they increase) and an adaptive solver "
                "picks its steps from the state's values, which a captured graph cannot follow: keep the layers to "
                "pipeline in one nn.Sequential, with the ODE block one layer of it, which the strategy cuts without "
                "capturing the forward (a fixed-step method trains as on one device; an adaptive one picks its steps "
                "from each micro-batch's rows).")
    if re.search(r"torchaudio[/\\]models[/\\]wav2vec2[/\\]", where) and "layer_drop" in where:  # (found by review)
        return ("torchaudio's wav2vec2 and HuBERT Transformer draws its LayerDrop coin with .item() for every layer "
                "in train mode, even at layer_drop=0, and branches on it, which one captured graph cannot follow: "
                "train Hugging Face's Wav2Vec2 or HuBERT (transformers) with config.layerdrop=0, which a graph "
                f"captures, {SEQUENTIAL_PATH} (the feature extractor, then the encoder's layers).")
    if re.search(r"torchaudio[/\\]models[/\\]", where) and "lengths" in where:  # (found by review)
        return ("torchaudio's models that take lengths (Conformer, Emformer, RNN-T) size their padding mask by the "
                "lengths' largest value, read as a Python number, which a captured graph cannot: train them on one "
                "device or with DDP (Trainer(strategy='ddp')), or copy the model's code with the mask made from the "
                "padded input's length, `torch.arange(x.shape[1]) >= lengths[:, None]`, which a graph captures.")
    if re.search(r": `assert ", where) and ("DataDependent" in name or "data-dependent" in text):  # (found by review:
        # pytorch-forecasting's DeepAR, `assert x["encoder_lengths"].min() > 0`)
        return ("The forward asserts something of its inputs' values, which a captured graph cannot check (it "
                "keeps no Python test of a tensor's value). In your own code, check it in the step before the model "
                "or in the collate_fn; in a library's model, train on one device or with DDP "
                f"(Trainer(strategy='ddp')), {SEQUENTIAL_PATH}.")
    if re.search(r"torch\.(isfinite|isinf|isnan)\(", where):  # (found by review: DETR's encoder layers)
        return ("The forward checks its values for infinities or NaNs and branches on the answer (Hugging Face's "
                "DETR-family encoder layers clamp in training when `not torch.isfinite(hidden_states).all()`), "
                "which one captured graph cannot follow: train such a model on one device or with DDP "
                f"(Trainer(strategy='ddp')), {SEQUENTIAL_PATH}, whose layers run as modules.")
    if "layerdrop" in where.lower() or "layer_drop" in where.lower():
        return ("LayerDrop skips layers at random, drawing anew each step, which one captured graph cannot: set the "
                "model's layer drop probabilities to 0 (a Hugging Face config's layerdrop, encoder_layerdrop and "
                f"decoder_layerdrop) to pipeline it; {SEQUENTIAL_PATH}.")
    if re.search(r"torch_geometric[/\\]nn[/\\]conv[/\\]", where) and (
            "DataDependent" in name or "data-dependent" in text):  # (found by review: GATConv, generic advice)
        return ("PyTorch Geometric's attention convolutions (GATConv, GATv2Conv, TransformerConv, ...) remove and "
                "add self loops with add_self_loops=True, keeping the edges a mask over their values selects, as many "
                "as those values say, which one captured graph cannot follow: build them with "
                "add_self_loops=False and add each graph's self loops in the dataset or the collate_fn "
                "(torch_geometric.utils.add_self_loops(edge_index, num_nodes=n)[0]), which trains as before.")
    if re.search(r"global_\w+_pool\(|scatter\(|torch_geometric[/\\](utils|nn[/\\]pool)", where) and (
            "DataDependent" in name or "data-dependent" in text or "Could not extract specialized" in text):
        return ("PyTorch Geometric's pooling and scatter count the graphs from the batch vector's values (batch.max() "
                "+ 1) where no size is given, which a captured graph cannot: give the model the number of graphs as "
                "the length of a tensor (torch.arange(len(graphs)), a tensor the step passes beside the nodes) and "
                "pass size=graph_ids.shape[0] (global_mean_pool(h, batch, size=graph_ids.shape[0])); a plain int "
                "would be a constant of the capture, which micro-batches of other counts of graphs could not share.")
    if re.search(r"torchvision[/\\]models[/\\]detection[/\\]", where):  # (found by review: generic advice)
        return ("torchvision's detection models (Faster, Mask and Keypoint R-CNN, RetinaNet, FCOS, SSD) pick a "
                "training size at random and read it as a Python number (GeneralizedRCNNTransform.torch_choice), and "
                "in training match anchors and sample boxes image by image from the targets' values, so each batch "
                "takes shapes and branches of its own, which one captured graph cannot follow: train them on one "
                "device or with DDP (Trainer(strategy='ddp')).")
    if ("DataDependent" in name or "data-dependent" in text) and "ForSequenceClassification" in where:
        return ("Hugging Face's ...ForSequenceClassification picks its loss from the labels' values when "
                "config.problem_type is unset (DeBERTa-v2 even looks for labels below 0): set model.config."
                "problem_type = 'single_label_classification' (or 'multi_label_classification', 'regression') before "
                "the fit, and it computes that loss as a graph can.")
    if ("DataDependent" in name or "data-dependent" in text) and "big_bird" in where.lower():
        return ("BigBird's block-sparse attention draws its random blocks with NumPy at every call, which a graph "
                "cannot: build it with config.attention_type='original_full', which a graph captures.")
    if "DataDependent" in name or "data-dependent" in text or "Could not extract specialized" in text:
        sizes = ("A size read from the batch's values (a padded batch trimmed to its longest row, "
                 "`x[:, :int(mask.sum(1).max())]`) cannot be captured either: trim in the collate_fn (each batch to "
                 "its longest row, as one device's step sees it; trimmed in the step, each micro-batch would be "
                 "trimmed to its own). A flag buffer guarding a first-call initialization (Glow's ActNorm, `if "
                 "self.initialized.item() == 0:`) neither: initialize on a batch before trainer.fit and take the "
                 "check out of forward. "
                 if "Could not extract specialized" in text or ".item()" in where else "")
        selected = ("A size counted from values (a selection by a boolean mask, `x[mask]`, `masked_select`, "
                    "`nonzero`, has as many rows as the mask's values say: VideoMAE's pre-training keeps the patches "
                    "`bool_masked_pos` leaves) cannot be followed by code that shapes or checks it: select a fixed "
                    "number by index instead (the kept positions from `argsort` of the mask, then `gather`, as "
                    "ViTMAE does), or train such a model on one device or with DDP. "
                    if re.search(r"Size-like symbols: u\d", text) and ".item()" not in where else "")
        library = selected + (
            "If the value is an input the model checks or takes sizes from (labels: Wav2Vec2ForCTC checks "
            "`labels.max()`, and a CTC loss counts each row's labels), call the model without it and compute the loss "
            "in the step from the model's outputs. " if "site-packages" in where or "dist-packages" in where else "")
        return (library + "Python control flow on a tensor's value (`if t > 0:`, `.item()`, `int(t)`) cannot be "
                "captured: compute both branches and pick with torch.where(condition, a, b), or use torch.cond; "
                + SEQUENTIAL_PATH + "." + (" " + sizes.rstrip() if sizes else ""))
    return f"Make forward capturable by torch.export.export(model, args, kwargs, strict=False), {SEQUENTIAL_PATH}."
