"""Concrete tensor shapes (batch 1) for every tensor of a model.

ONNX shape inference with data propagation answers for nearly every CNN at no runtime cost; when it
leaves a tensor unknown (custom shape arithmetic, exotic ops) the model is run once in onnxruntime with
every intermediate tensor fetched.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from graphprune.data.dataset import ImageInput
from graphprune.errors import GraphPruneError, InvalidModelError

log = logging.getLogger(__name__)

# Concrete sizes for named graph inputs (e.g. {"input": (1, 3, 224, 224)}), for models whose spatial
# sizes are symbolic.
InputShapes = dict[str, tuple[int, ...]]


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initialisers."""
    initialisers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initialisers]


def image_shape(model: onnx.ModelProto) -> ImageInput | None:
    """The model's only image input: [N, C, H, W] with C 1 or 3, or channels-last [N, H, W, C] (Keras
    through tf2onnx), H and W fixed; else None. What a folder of images is converted, fitted and laid
    out to for it."""
    inputs = data_inputs(model)
    dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
    sizes = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    if len(sizes) != 4:
        return None
    if sizes[1] in (1, 3) and min(sizes[2:]) > 0:
        return ImageInput(sizes[1], sizes[2], sizes[3])
    if sizes[3] in (1, 3) and min(sizes[1:3]) > 0:
        return ImageInput(sizes[3], sizes[1], sizes[2], channels_last=True)
    return None


def symbolic_spatial_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of graph inputs with a symbolic or unknown size on an axis other than the batch."""
    return [
        value.name
        for value in data_inputs(model)
        if any(not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim[1:])
    ]


def with_input_shapes(model: onnx.ModelProto, shapes: InputShapes) -> onnx.ModelProto:
    """A copy whose named inputs (the name "" means the only input) take the given sizes on every
    symbolic axis but the batch (which stays as it is); refuses unknown names, wrong ranks and sizes
    that contradict a static one."""
    if not shapes:
        return model
    inputs = {value.name: value for value in data_inputs(model)}
    if "" in shapes:  # sizes given without a name: the model's only input
        if len(inputs) != 1:
            raise GraphPruneError(
                f"the model has inputs {', '.join(inputs)}; name the one --input-shape sizes (NAME:1x3x224x224)."
            )
        shapes = {next(iter(inputs)): shapes[""], **{k: v for k, v in shapes.items() if k}}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise GraphPruneError(
            f"--input-shape names {unknown[0]!r}, which is not an input of the model; its inputs are "
            f"{', '.join(inputs)}."
        )
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        shape = shapes.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise GraphPruneError(
                f"--input-shape gives {value.name} rank {len(shape)}, but the model's input has rank {len(dims)}."
            )
        for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise GraphPruneError(
                    f"--input-shape gives {value.name} size {size} on axis {axis}, where the model fixes "
                    f"{dim.dim_value}."
                )
            if axis and not dim.HasField("dim_value"):
                dim.dim_value = size
    return fixed


def restore_inputs(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Give `model`'s graph inputs the types (symbolic sizes included) they have in `original`."""
    types = {value.name: value.type for value in original.graph.input}
    for value in model.graph.input:
        if value.name in types:
            value.type.CopyFrom(types[value.name])


def _static_dims(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for dim in type_proto.tensor_type.shape.dim:
        if not dim.HasField("dim_value"):
            return None
        dims.append(dim.dim_value)
    return tuple(dims)


def with_batch_one(model: onnx.ModelProto, *, weights_as_inputs: bool = False) -> onnx.ModelProto:
    """Copy of the model whose graph inputs have every symbolic dimension set to 1.

    With weights_as_inputs, large initializers become typed graph inputs instead, so shape inference
    does not serialise megabytes of weights it never reads.
    """
    fixed = onnx.ModelProto()
    graph = model.graph
    if weights_as_inputs:
        big = [init for init in graph.initializer if _elements(init) > 64]
        small = [init for init in graph.initializer if _elements(init) <= 64]
        fixed.CopyFrom(
            onnx.helper.make_model(
                onnx.helper.make_graph(
                    list(graph.node),
                    graph.name,
                    list(graph.input),
                    list(graph.output),
                    small,
                ),
                opset_imports=list(model.opset_import),
                ir_version=model.ir_version,
            )
        )
        fixed.graph.input.extend(
            onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)) for init in big
        )
    else:
        fixed.CopyFrom(model)
    initializer_names = {init.name for init in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in initializer_names:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    del fixed.graph.value_info[:]
    return fixed


def _elements(init: onnx.TensorProto) -> int:
    count = 1
    for dim in init.dims:
        count *= dim
    return count


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor (graph inputs, initializers, node outputs) with the batch set to 1."""
    fixed = with_batch_one(model, weights_as_inputs=True)
    shapes: dict[str, tuple[int, ...]] = {init.name: tuple(init.dims) for init in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference failures fall back to running the model
        log.debug("onnx shape inference failed (%s); running the model instead", exc)
        inferred = fixed
    graph = inferred.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        dims = _static_dims(value.type)
        if dims is not None:
            shapes.setdefault(value.name, dims)
    wanted = [out for node in graph.node for out in node.output if out]
    missing = [name for name in wanted if name not in shapes]
    if missing:
        log.debug("%d tensors without static shapes; running onnxruntime", len(missing))
        for name, value in run_intermediates(with_batch_one(model), missing).items():
            shapes[name] = tuple(value.shape)
    return shapes


def run_intermediates(model: onnx.ModelProto, names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Values of the named tensors on one seeded random input at batch 1."""
    from graphprune.runtime.session import input_feed, make_session

    session = make_session(model, extra_outputs=names)
    try:
        values = session.run(names, input_feed(model, batch=1, seed=seed))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises many types
        raise InvalidModelError(f"onnxruntime could not run the model to read tensor shapes: {exc}") from exc
    return dict(zip(names, values, strict=True))
