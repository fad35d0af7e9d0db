"""Fold a pruned ONNX graph back into PyTorch, so the smaller model can be fine-tuned.

Two ways:

- `apply_to_module(module, pruned)`: the user's own nn.Module takes the pruned shapes and values by
  parameter name (graphprune's export keeps initializer names equal to parameter names). Conv, BN and
  Linear layers get new Parameters/buffers and updated channel attributes; the user keeps their class,
  forward and training code.
  A graph whose BN was folded into the convs (the exporters' default) cannot fold back onto a module
  with BatchNorm layers: that is refused with UnsupportedModelError.
- `onnx_to_module(pruned)`: for ONNX-only models, onnx2torch converts the cleaned graph (Identity
  nodes on shared initializers folded first, so every BatchNormalization reads its own initializers
  and becomes an nn.BatchNorm with trainable gamma and beta instead of a functional op on buffers).
  onnx2torch 1.5.15 knows ops up to opset 17 (not ReduceMean-18, which the dynamo exporter emits),
  so newer graphs are brought down to opset 17 by onnx.version_converter first.

`verify_foldback` re-exports a folded module and compares it with the pruned graph in onnxruntime:
the fold-back must be exact before any training starts.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.version_converter
import torch
from onnx import numpy_helper
from torch import nn

from graphprune.errors import UnsupportedModelError, VerificationError
from graphprune.model_io import as_loaded, clean
from graphprune.runtime.shapes import data_inputs

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]
# Batch used for symbolic batch dimensions when checking a fold-back.
CHECK_BATCH = 2
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# The newest opset onnx2torch 1.5.15 has converters for (its ReduceMean stops at 13, Reshape at 14).
ONNX2TORCH_OPSET = 17


def _proto(model: ModelLike) -> onnx.ModelProto:
    return as_loaded(model).proto


def _conv_groups(model: onnx.ModelProto) -> dict[str, int]:
    """The `group` attribute of every Conv node, keyed by the name of its weight input."""
    groups = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            groups[node.input[1]] = group
    return groups


def apply_to_module(module: nn.Module, pruned: ModelLike) -> nn.Module:
    """Give `module` the shapes and values of the pruned graph, matching tensors by name; return it.

    Every parameter or buffer whose fully qualified name is an initializer of the pruned model gets
    that initializer's value (a new Parameter when the shape changes, `requires_grad` kept); Conv,
    BatchNorm and Linear layers also get their channel attributes (in/out channels, groups from the
    Conv node, num_features, in/out features). Tensors the graph does not name are left alone, but a
    layer left with inconsistent shapes raises UnsupportedModelError.
    """
    model = clean(_proto(pruned))
    values = {init.name: init for init in model.graph.initializer}
    _check_batchnorm_kept(module, model, set(values))
    groups = _conv_groups(model)
    matched = 0
    for prefix, layer in module.named_modules():
        for name, tensor in _tensors(layer):
            full = _qualified(prefix, name)
            init = values.get(full)
            if init is None or tensor is None:
                continue
            _replace_tensor(layer, name, tensor, numpy_helper.to_array(init), full)
            matched += 1
        _update_attributes(prefix, layer, groups)
    if matched == 0:
        raise UnsupportedModelError(
            f"No initializer of the pruned model is named like a parameter of {type(module).__name__}; "
            "fold back onto the module the model was exported from, or use onnx_to_module."
        )
    logger.info("Folded %d tensors of the pruned model into %s.", matched, type(module).__name__)
    return module


def _tensors(layer: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """The layer's own parameters and buffers, by local name."""
    return [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_batchnorm_kept(module: nn.Module, model: onnx.ModelProto, names: set[str]) -> None:
    """Refuse a module whose BatchNorm layers the graph has no tensors for because its BN was folded."""
    layers = [(prefix, layer) for prefix, layer in module.named_modules() if isinstance(layer, _BATCHNORM)]
    absent = [
        prefix
        for prefix, layer in layers
        if not any(_qualified(prefix, name) in names for name, _ in _tensors(layer))
    ]
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    if absent and bn_nodes < len(layers):
        raise UnsupportedModelError(
            f"The graph's BatchNorm was folded into the convs ({len(absent)} of {len(layers)} BatchNorm layers "
            f"of {type(module).__name__}, e.g. '{absent[0]}', have no tensors in it), so it cannot fold back "
            "onto this module; export with BN kept (graphprune export) or fold back without --module."
        )


def _replace_tensor(layer: nn.Module, name: str, old: torch.Tensor, value: np.ndarray, full: str) -> None:
    """Put `value` into `layer.<name>`, as a new Parameter/buffer when the shape changes."""
    new = torch.from_numpy(np.array(value, copy=True)).to(device=old.device, dtype=old.dtype)
    if new.ndim != old.ndim:
        raise UnsupportedModelError(
            f"Initializer {full} has shape {tuple(new.shape)} but the module's tensor has "
            f"{tuple(old.shape)}; fold back onto the module the model was exported from."
        )
    with torch.no_grad():
        if new.shape == old.shape:
            old.copy_(new)
        elif isinstance(old, nn.Parameter):
            layer.register_parameter(name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            layer.register_buffer(name, new, persistent=name not in layer._non_persistent_buffers_set)


def _update_attributes(prefix: str, layer: nn.Module, groups: dict[str, int]) -> None:
    """Make a Conv/BN/Linear layer's channel attributes agree with its (new) tensors."""
    if isinstance(layer, _CONV):
        weight = layer.weight
        layer.groups = groups.get(f"{prefix}.weight", layer.groups)
        layer.out_channels = weight.shape[0]
        layer.in_channels = weight.shape[1] * layer.groups
        consistent = weight.shape[0] % layer.groups == 0 and (
            layer.bias is None or layer.bias.shape[0] == weight.shape[0]
        )
    elif isinstance(layer, _BATCHNORM):
        layer.num_features = (
            layer.running_mean.shape[0] if layer.running_mean is not None else layer.weight.shape[0]
        )
        tensors = [layer.weight, layer.bias, layer.running_mean, layer.running_var]
        consistent = all(t is None or t.shape[0] == layer.num_features for t in tensors)
    elif isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = layer.weight.shape
        consistent = layer.bias is None or layer.bias.shape[0] == layer.out_features
    else:
        return
    if not consistent:
        raise UnsupportedModelError(
            f"Layer '{prefix}' ({type(layer).__name__}) has inconsistent shapes after fold-back (some of its "
            "tensors are not initializers of the pruned model); export the model with graphprune's exporter "
            "so every parameter keeps its name."
        )


def onnx_to_module(pruned: ModelLike) -> nn.Module:
    """A trainable torch module (onnx2torch) computing the pruned graph, with BN gamma/beta trainable."""
    from onnx2torch import convert

    _export_opset_for_onnx2torch()
    model = _for_onnx2torch(clean(_proto(pruned)))
    try:
        module = convert(model)
    except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError ... for unsupported ops
        raise UnsupportedModelError(
            f"onnx2torch cannot convert the model ({type(exc).__name__}: {exc}); fold back onto your own "
            "nn.Module with apply_to_module instead."
        ) from exc
    _check_batchnorm_trainable(model, module)
    return module


def _export_opset_for_onnx2torch() -> None:
    """Let onnx2torch's modules read the export opset while they are exported (its Shape, Gather ...
    export themselves through it). onnx2torch takes it from the module `from torch.onnx import
    symbolic_helper` gives; since torch 2.9 that is a compatibility module without GLOBALS once anything
    imported it by its full name (the dynamo exporter does), and every export of such a module then
    failed (AttributeError: _export_onnx_opset_version) in a process that had made a dynamo export."""
    from onnx2torch.utils import common

    if not hasattr(common.symbolic_helper, "GLOBALS"):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        common.symbolic_helper = symbolic_helper


def _for_onnx2torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph in a form onnx2torch converts: opset 17 at most, and no Reshape `allowzero` it cannot read.

    Down-conversion turns opset-18 inputs (ReduceMean axes) back into attributes. `allowzero=1` (dynamo
    exporter) only changes what a 0 in the target shape means, so it is dropped where the shape is a
    constant without zeros. A graph the version converter cannot handle is left for onnx2torch to try.
    A Reshape that keeps the batch axis but spells out the export's fixed batch is made batch-free first.
    """
    model = _batch_free_reshapes(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), ONNX2TORCH_OPSET)
    if opset > ONNX2TORCH_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, ONNX2TORCH_OPSET)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError, ValueError, ...
            logger.info("Cannot bring opset %d down to %d for onnx2torch (%s).", opset, ONNX2TORCH_OPSET, exc)
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        shape = constants.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if shape is not None and numpy_helper.to_array(shape).all():
            kept = [attr for attr in node.attribute if attr.name != "allowzero"]
            del node.attribute[:]
            node.attribute.extend(kept)
    return model


def _batch_free_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each Reshape to a constant [B, ...] that keeps the batch axis (its input is B x the
    same elements) reading [0, ...] instead (0: copy the input's size), B being the graph input's fixed
    batch: exact at B and free at any other, so a model the dynamo exporter wrote without dynamic shapes
    (Reshape(x, [1, 576]) before the classifier) can be fine-tuned at batch 128.  Unchanged when the
    batch is symbolic or no Reshape qualifies."""
    initializers = {init.name: init for init in model.graph.initializer}
    first = data_inputs(model)[0].type.tensor_type.shape.dim[:1]
    if not first or not first[0].HasField("dim_value"):
        return model
    fixed = first[0].dim_value
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read is left for onnx2torch as it is
        return model
    dims = {
        value.name: [
            d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
        ]
        for value in [*inferred.graph.value_info, *inferred.graph.input]
    }
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    for node in freed.graph.node:
        target = (
            initializers.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        )
        data = dims.get(node.input[0])
        if target is None or not data or None in data or data[0] != fixed:
            continue
        shape = numpy_helper.to_array(target)
        rest = shape[1:]
        if (
            shape.size == 0
            or shape[0] != fixed
            or 0 in rest
            or (-1 not in rest and rest.prod() != np.prod(data[1:]))
        ):
            continue
        name = f"{target.name}_batch_free_{node.name or len(freed.graph.initializer)}"
        freed.graph.initializer.append(numpy_helper.from_array(np.r_[0, rest].astype(shape.dtype), name))
        node.input[1] = name
        kept = [attr for attr in node.attribute if attr.name != "allowzero"]  # 0: copy the input's size
        del node.attribute[:]
        node.attribute.extend(kept)
    return freed


def _check_batchnorm_trainable(model: onnx.ModelProto, module: nn.Module) -> None:
    """Every BatchNormalization node must have become an nn.BatchNorm with Parameters gamma and beta."""
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    trainable = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and isinstance(m.weight, nn.Parameter)
        and isinstance(m.bias, nn.Parameter)
    ]
    if len(trainable) < bn_nodes:
        raise UnsupportedModelError(
            f"Only {len(trainable)} of {bn_nodes} BatchNormalization nodes became trainable BatchNorm layers "
            "(the others read computed tensors, so their gamma/beta would be frozen buffers); fold back onto "
            "your own nn.Module with apply_to_module instead."
        )


def input_shape(model: onnx.ModelProto, batch: int = CHECK_BATCH) -> tuple[int, ...]:
    """Concrete shape of the model's first graph input, `batch` for a symbolic batch dimension."""
    graph_input = data_inputs(model)[0]
    dims = graph_input.type.tensor_type.shape.dim
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else batch for dim in dims)
    if any(size <= 0 for size in shape[1:]):
        raise UnsupportedModelError(
            f"Input '{graph_input.name}' has a symbolic non-batch dimension {shape}; give the model fixed "
            "C, H, W to fold it back."
        )
    return shape


def verify_foldback(module: nn.Module, pruned: ModelLike, *, seed: int = 0, tolerance: float = 1e-4) -> float:
    """Re-export `module` (BN kept) and compare its ONNX outputs with the pruned graph's on a seeded
    random batch; return the max relative error or raise VerificationError above `tolerance`. A graph
    with a fixed batch must also run at another batch size (training needs that)."""
    from graphprune.runtime.session import make_session
    from graphprune.torch_bridge.export import export

    reference = _proto(pruned)
    shape = input_shape(reference)
    batch = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    _check_runs(module, shape)
    _check_batch_free(module, reference)  # before the export, which traces at another batch size
    with tempfile.TemporaryDirectory(prefix="graphprune-foldback-") as tmp:
        try:
            exported = export(module, torch.from_numpy(batch), Path(tmp) / "folded.onnx", fold_bn=False)
        except RuntimeError as exc:  # traced at another batch size than the graph's own
            raise VerificationError(
                f"The folded-back module does not export ({exc}); the fold-back is wrong."
            ) from exc
        got = _run(make_session(exported), batch)
    want = _run(make_session(reference), batch)
    if got.shape != want.shape:
        raise VerificationError(
            f"The folded-back module outputs shape {got.shape}, the pruned graph {want.shape}; the fold-back "
            "is wrong."
        )
    error = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    if not error <= tolerance:
        raise VerificationError(
            f"The folded-back module differs from the pruned graph (max rel err {error:.3g} > {tolerance:g}); "
            "do not fine-tune it, report the model."
        )
    logger.info("Fold-back equal to the pruned graph: max rel err %.3g.", error)
    return error


def _check_runs(module: nn.Module, shape: tuple[int, ...]) -> None:
    """Refuse a module that does not run on the pruned graph's own input shape (a layer the fold-back
    left with shapes that do not chain)."""
    try:
        _run_module(module, shape)
    except RuntimeError as exc:
        raise VerificationError(
            f"The folded-back module does not run on the pruned graph's input {shape} ({exc}); the "
            "fold-back is wrong."
        ) from exc


def _check_batch_free(module: nn.Module, model: onnx.ModelProto) -> None:
    """Refuse a module that computes only at the graph's fixed batch size: one that fails, or answers
    for another batch, at the next size (a batch folded into another axis)."""
    shape = input_shape(model)
    if shape != input_shape(model, CHECK_BATCH + 1):
        return  # the batch is symbolic: the exporter kept it free
    other = shape[0] + 1
    try:
        outputs = _run_module(module, (other, *shape[1:]))
        if any(output.shape[:1] != (other,) for output in outputs):
            raise RuntimeError(f"an output's batch is not {other}")
    except RuntimeError as exc:
        raise UnsupportedModelError(
            f"The model was exported with a fixed batch of {shape[0]} and computes only at that size, so it "
            "cannot be fine-tuned; export it with a dynamic batch (dynamic_shapes or dynamic_axes in "
            "torch.onnx.export, or graphprune export)."
        ) from exc


def _run_module(module: nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The outputs of one inference (eval mode, no gradients) of `module` on zeros of `shape`, its mode
    kept."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            outputs = module(torch.zeros(*shape, device=device))
    finally:
        module.train(was_training)
    return (
        [outputs]
        if isinstance(outputs, torch.Tensor)
        else [o for o in outputs if isinstance(o, torch.Tensor)]
    )


def _run(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """First output of an onnxruntime session on `batch` fed to its first input."""
    return np.asarray(session.run(None, {session.get_inputs()[0].name: batch})[0])
