"""Export a torch module to ONNX in the form graphprune prunes best: BatchNorm kept, names kept, batch dynamic.

Both PyTorch exporters fuse BatchNorm into Conv by default (legacy: constant folding; dynamo: its
optimizer), which hides the BN scales that Network Slimming and Gate Decorator read. `export` turns
that off and cleans up what each exporter leaves behind:

- legacy (TorchScript): `do_constant_folding=False`, `training=EVAL`. Its initializer de-duplication
  replaces parameters that happen to hold equal values (fresh BN: gamma == running_var == 1) by
  `Identity` nodes reading one shared initializer; each such Identity becomes an initializer of its
  own again, so every parameter keeps its own name and nothing is shared by accident.
- dynamo (torch.export): exported with `optimize=False`, then constant folding that never touches a
  parameter and shape-only rewrites; onnxscript's default optimizer is not used because it fuses BN
  and deletes parameters whose current values look like no-ops (zero biases, x*1). Parameters keep
  their names; folded constants (Clip bounds, ReduceMean axes) become extra initializers named by the
  exporter ("val_17", "min_val_cast"). It emits opset 18 at least: its converter to 17 fails on the
  ReduceMean it emits, so a lower `opset` is raised to 18.

`fold_bn=True` instead produces the fused model users often ship: each BN that directly follows a Conv
(and is its only consumer) is folded into the conv in torch (torch.fx + fuse_conv_bn_eval) before
export. BNs with no such conv (DenseNet's pre-activation BN after a Concat) cannot be folded and stay.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Literal

import onnx
import onnx.numpy_helper
import torch
from torch import nn

from graphprune.errors import GraphPruneError, InvalidModelError, UnsupportedModelError
from graphprune.model_io import fold_constants, save_model, set_metadata

logger = logging.getLogger(__name__)

Exporter = Literal["legacy", "dynamo"]
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "batch"
DYNAMO_MIN_OPSET = 18
# Above this the ModelProto cannot be serialised in one piece, so weights must go to external data.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**26
# Smaller tensors stay inline: onnxruntime's shape inference cannot read ReduceMean axes or Reshape
# shapes from external data.


def export(
    module: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    *,
    exporter: Exporter = "legacy",
    fold_bn: bool = False,
    dynamic_batch: bool = True,
    opset: int = 17,
    external_data: bool | None = None,
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """Export a deep copy of `module` (in eval mode) to `path` and return the model as written.

    The graph input is named "input" and the output "output"; with `dynamic_batch` their first dim is
    the symbol "batch". `external_data=True` writes every tensor of 1 KiB or more to `<path>.data`
    beside the model; None writes them inline unless the model is too large for one protobuf.
    `metadata` goes into the model's metadata_props. The user's module is never modified.
    """
    if exporter not in ("legacy", "dynamo"):
        raise GraphPruneError(f"Unknown exporter '{exporter}'; use 'legacy' or 'dynamo'.")
    model = copy.deepcopy(module).eval()
    if fold_bn:
        model = _fold_batchnorm(model)
    example = _example_for_export(example_input, dynamic_batch)
    with torch.no_grad():
        if exporter == "legacy":
            proto = _export_legacy(model, example, opset=opset, dynamic_batch=dynamic_batch)
        else:
            proto = _export_dynamo(model, example, opset=opset, dynamic_batch=dynamic_batch)
    fold_constants(proto, frozenset({"Identity"}))
    remove_unused_initializers(proto)
    _check_export(proto, model, fold_bn=fold_bn)
    set_metadata(proto, metadata or {})
    if external_data is None:
        external_data = proto.ByteSize() > PROTOBUF_LIMIT_BYTES
    save_model(proto, path, external_data=external_data)
    return onnx.load(os.fspath(path))


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode `model` with every Conv->BN pair fused into one conv with bias."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced with torch.fx to fold BatchNorm ({exc}); "
            "export with fold_bn=False instead."
        ) from exc


def _example_for_export(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    """The example as a detached tensor; batch 1 is doubled for a dynamic batch (torch.export specialises 1)."""
    if not isinstance(example_input, torch.Tensor):
        raise GraphPruneError(
            f"The example input must be a torch.Tensor, got {type(example_input).__name__}; pass one batch tensor."
        )
    example = example_input.detach()
    if dynamic_batch and example.shape[0] == 1:
        example = torch.cat([example, example])
    return example


def _export_legacy(
    model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    """TorchScript export with constant folding off, so BatchNormalization nodes survive."""
    buffer = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: BATCH_DIM}, OUTPUT_NAME: {0: BATCH_DIM}} if dynamic_batch else None
    with warnings.catch_warnings():
        # Choosing the TorchScript exporter is deliberate here; its deprecation notices are not news.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            keep_initializers_as_inputs=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def _export_dynamo(
    model: nn.Module, example: torch.Tensor, *, opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    """torch.export-based export, then a clean-up that keeps BatchNormalization (see module docstring)."""
    import onnx_ir as ir
    import onnxscript

    if opset < DYNAMO_MIN_OPSET:
        logger.info(
            "The dynamo exporter emits opset %d at least; exporting opset %d.",
            DYNAMO_MIN_OPSET,
            DYNAMO_MIN_OPSET,
        )
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM)},) if dynamic_batch else None
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        optimize=False,
        verbose=False,
        opset_version=max(opset, DYNAMO_MIN_OPSET),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic_shapes,
    )
    state = set(model.state_dict())

    def fold_unless_reads_state(node: ir.Node) -> bool | None:
        """Fold shape arithmetic freely, but never an op that reads a parameter (it would lose its name)."""
        if node.op_type in ("Shape", "Size"):
            return None
        return False if any(value is not None and value.name in state for value in node.inputs) else None

    ir_model = program.model
    onnxscript.optimizer.fold_constants(ir_model, should_fold=fold_unless_reads_state)
    ir_model = onnxscript.rewriter.rewrite(ir_model, _shape_only_rules())
    onnxscript.optimizer.remove_unused_nodes(ir_model)
    proto = ir.serde.serialize_model(ir_model)
    _drop_zero_constant_conv_bias(proto, state)
    return proto


def _shape_only_rules() -> list[object]:
    """onnxscript rewrites that depend on shapes only, never on parameter values.

    Its default set also fuses BN into Conv and drops all-zero biases and x+0 / x*1 ops, which would
    delete freshly initialised parameters (zero biases, unit gates) from the graph.
    """
    from onnxscript.rewriter.rules import common as rules

    return [
        rules.cast_cast_rule,
        rules.no_op_cast_rule,
        rules.no_op_expand_rule,
        rules.no_op_transpose_rule,
        rules.transpose_transpose_rule,
        rules.reshape_reshape_rule,
        rules.squeeze_reshape_1d_rule,
        rules.unsqueeze_unsqueeze_rule,
        rules.materialize_reshape_shape_rule,
        rules.collapse_slice_rule,
        rules.collapse_slice2_rule,
    ]


def _drop_zero_constant_conv_bias(model: onnx.ModelProto, state: set[str]) -> None:
    """Remove the all-zero constant bias the dynamo exporter gives each bias-free conv (not a parameter)."""
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) == 3 and node.input[2] not in state:
            bias = values.get(node.input[2])
            if bias is not None and not onnx.numpy_helper.to_array(bias).any():
                del node.input[2]


def remove_unused_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node (or graph output) reads; return how many were dropped."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    dropped = len(graph.initializer) - len(kept)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return dropped


def _check_export(model: onnx.ModelProto, module: nn.Module, *, fold_bn: bool) -> None:
    """Fail on an invalid model; warn where BN nodes or parameter names did not survive as promised."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(
            f"The exported model fails onnx.checker ({exc}); report this exporter output."
        ) from exc
    bn_nodes = sum(node.op_type == "BatchNormalization" for node in model.graph.node)
    bn_modules = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if fold_bn and bn_nodes:
        logger.info("%d BatchNormalization nodes follow no foldable conv and stay in the model.", bn_nodes)
    elif not fold_bn and bn_nodes < bn_modules:
        logger.warning(
            "The module has %d BatchNorm layers but the export has %d BatchNormalization nodes "
            "(unused layers or fused by the exporter).",
            bn_modules,
            bn_nodes,
        )
    names = {init.name for init in model.graph.initializer}
    missing = [name for name, _ in module.named_parameters() if name not in names]
    if missing:
        logger.warning(
            "%d parameters are not initializers under their own name (unused in forward?): %s",
            len(missing),
            ", ".join(missing[:5]),
        )
