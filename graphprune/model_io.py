"""Loading, cleaning and atomically saving ONNX models (external data included); the model-level
properties (metadata_props, doc string, version) a rewritten model keeps, and the input normalisation
graphprune records among them."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from graphprune.errors import InvalidModelError
from graphprune.onnxutil import atomic_write, sha256_file
from graphprune.ops import OPS

# Nodes that only rearrange constants (their OpSpec can fold them): clean() turns them into initializers.
FOLDABLE_OPS = frozenset(name for name, spec in OPS.items() if spec.fold is not None)

log = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)
# With external data, tensors of at least this many bytes leave the model file.
EXTERNAL_MIN_BYTES = 1024
# The metadata_props key under which a model records how its 8-bit inputs are normalised (MEAN/STD or
# a preset of graphprune.data.image_norm): eval, prune, finetune and the recipes read their data so.
IMAGE_NORM_KEY = "graphprune.image_norm"


@dataclass
class LoadedModel:
    """A model read from disk: the proto (weights in memory) and how it was stored."""

    proto: onnx.ModelProto
    path: Path | None
    external_data: bool


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read and check an ONNX file; any failure is one InvalidModelError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise InvalidModelError(f"{file}: no such file.")
    try:
        header = onnx.load(str(file), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise InvalidModelError(f"{file}: not a readable ONNX model ({type(exc).__name__}: {exc}).") from exc
    if not header.graph.node:
        raise InvalidModelError(f"{file}: not an ONNX model (the graph has no nodes).")
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in header.graph.initializer)
    try:
        proto = onnx.load(str(file), load_external_data=True) if external else header
    except Exception as exc:  # noqa: BLE001
        raise InvalidModelError(f"{file}: its external data is missing or unreadable ({exc}).") from exc
    _check(proto, file)
    return LoadedModel(proto, file, external)


def _check(model: onnx.ModelProto, file: Path) -> None:
    """onnx.checker, forgiving where onnxruntime is not: converters (tf2onnx, say) write models the
    checker objects to (nodes out of topological order, ...) that onnxruntime runs, and those are
    analysed with a warning; a model neither accepts is refused with both objections."""
    try:
        onnx.checker.check_model(model)
        return
    except Exception as exc:  # noqa: BLE001 - the checker raises ValidationError and friends
        objection = " ".join(str(exc).split())
    refusal = _onnxruntime_refusal(file)
    if refusal is not None:
        unknown = sorted({n.op_type for n in model.graph.node if not onnx.defs.has(n.op_type, n.domain)})
        hint = (
            f"; {', '.join(unknown)} are no ONNX ops (left unconverted by the exporter?)" if unknown else ""
        )
        raise InvalidModelError(
            f"{file}: the model fails onnx.checker ({objection}) and onnxruntime cannot open it either "
            f"({refusal}){hint}."
        )
    log.warning("%s fails onnx.checker (%s), but onnxruntime runs it: analysing it anyway", file, objection)


def as_loaded(model: LoadedModel | onnx.ModelProto | str | os.PathLike[str]) -> LoadedModel:
    """Accept a path, a proto or an already loaded model."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(model, None, False)
    return load_model(model)


def model_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 identifying a model: its file's bytes, and those of the external data files it names."""
    file = Path(path)
    header = onnx.load(str(file), load_external_data=False)
    locations = dict.fromkeys(
        entry.value
        for init in header.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    )
    if not locations:
        return sha256_file(file)
    digest = hashlib.sha256()
    for part in [file, *(file.parent / location for location in locations)]:
        digest.update(sha256_file(part).encode())
    return digest.hexdigest()


def clean(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy ready for analysis: Constant nodes and layout ops on initializers (Transpose, Unsqueeze,
    Squeeze) become initializers; each Identity-on-initializer becomes its own copy of the initializer
    (the exporter shares equal tensors between layers that are not tied), and so does each further
    reader of an initializer whose values are all equal (see unshare_uniform); initializers leave the
    graph inputs; every node gets a unique name; nodes come in topological order."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    toposort(graph)
    fold_constants(out, FOLDABLE_OPS)
    unshare_uniform(graph)
    values = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in values]
    del graph.input[:]
    graph.input.extend(inputs)
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return out


def _onnxruntime_refusal(file: Path) -> str | None:
    """Why onnxruntime cannot open the model file, or None when it can (only opened here: everything
    that runs a model goes through graphprune.runtime.session, a layer above this one)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        return " ".join(str(exc).split())[:300]
    return None


def toposort(graph: onnx.GraphProto) -> None:
    """In place: order nodes so that each comes after the producers of its inputs (stable; converters
    such as tf2onnx may write them out of order, which op rules read in order could not follow)."""
    ready = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if set(node.input) <= ready:
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):  # a cycle or a dangling input: left as it was (checks will say)
            ordered.extend(waiting)
            break
        pending = waiting
    if [id(n) for n in ordered] != [id(n) for n in graph.node]:
        copies = [onnx.NodeProto() for _ in ordered]
        for copy, node in zip(copies, ordered, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)


def unshare_uniform(graph: onnx.GraphProto) -> int:
    """In place: every node input after the first that reads a float initializer of equal values (zero
    biases, unit scales) reads its own copy instead.  Simplifiers (onnxslim, ultralytics' export)
    deduplicate equal constants across layers; read as a shared weight, such a tensor would tie layers
    that hold the same numbers by chance, up to a whole network in one group.  Returns the copies made."""
    values = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in values:
                readers.setdefault(name, []).append((node, index))
    names = set(values) | {out for node in graph.node for out in node.output}
    copies = 0
    for name, uses in readers.items():
        init = values[name]
        if len(uses) < 2 or init.data_type not in FLOAT_TYPES or int(np.prod(init.dims)) < 2:
            continue
        array = numpy_helper.to_array(init)
        if not np.all(array == array.flat[0]):
            continue
        for node, index in uses[1:]:
            copies += 1
            fresh = f"{name}__{copies}"
            while fresh in names:
                fresh += "_"
            names.add(fresh)
            graph.initializer.append(numpy_helper.from_array(array, fresh))
            node.input[index] = fresh
    return copies


def fold_constants(model: onnx.ModelProto, op_types: frozenset[str]) -> int:
    """In place: each node of `op_types` that only rearranges constants becomes an initializer named
    after its output (so consumers are untouched and no two parameters share storage); nodes feeding a
    graph output stay.  Initializers that only folded nodes read go (a Linear's weight behind its
    folded Transpose was half of convnext_tiny's bytes, read and copied again by every later step).
    Returns how many were folded."""
    graph = model.graph
    values = {init.name: init for init in graph.initializer}
    outputs = {value.name for value in graph.output}
    kept, folded_inputs = [], set()
    folded = 0
    for node in graph.node:
        tensor = None if node.op_type not in op_types or node.output[0] in outputs else _fold(node, values)
        if tensor is None:
            kept.append(node)
            continue
        graph.initializer.append(tensor)
        values[tensor.name] = tensor
        folded_inputs.update(node.input)
        folded += 1
    if not folded:
        return 0
    del graph.node[:]
    graph.node.extend(kept)
    needed = _names_read(kept) | outputs | {value.name for value in graph.input}
    orphans = folded_inputs - needed
    # deleted in place, last first: re-adding the live ones would copy every weight's bytes
    for index in reversed([i for i, init in enumerate(graph.initializer) if init.name in orphans]):
        del graph.initializer[index]
    return folded


def _names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Every tensor name the nodes read, inside their subgraphs (If / Loop / Scan bodies) too."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= _names_read(sub.node)
    return names


def _fold(node: onnx.NodeProto, values: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    """The initializer a node reduces to when it only rearranges constants (its OpSpec's `fold`), or None."""
    if any(name and name not in values for name in node.input):
        return None
    inputs = [numpy_helper.to_array(values[name]) if name else None for name in node.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    value = OPS[node.op_type].fold(inputs, attrs)
    # np.asarray, not np.ascontiguousarray: the latter turns a 0-d constant into shape [1]
    return None if value is None else numpy_helper.from_array(np.asarray(value), node.output[0])


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata_props as a dict."""
    return {prop.key: prop.value for prop in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Set `entries` in the model's metadata_props (replacing those keys, keeping the others)."""
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def keep_model_properties(model: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """Give a rewritten or re-exported model the source's metadata_props (class names, strides, the
    image normalisation: what deployment code reads), doc string, domain and model version."""
    set_metadata(model, metadata(source))
    model.doc_string, model.domain = source.doc_string, source.domain
    model.model_version = source.model_version


def input_image_norm(model: onnx.ModelProto, given: str | None = None) -> str | None:
    """How to normalise 8-bit data for `model`: as `given`, else as the model records (IMAGE_NORM_KEY),
    else None (the data's own statistics, with a warning: graphprune.data.load_dataset)."""
    return given or metadata(model).get(IMAGE_NORM_KEY)


def image_norm_metadata(applied: str | None) -> dict[str, str]:
    """The metadata entry recording the normalisation a model's training data got (none for floats)."""
    return {IMAGE_NORM_KEY: applied} if applied is not None else {}


def trained_metadata(start: onnx.ModelProto | None, applied: str | None) -> dict[str, str]:
    """What a model trained from `start` (None: from scratch) on images normalised as `applied` records:
    the start's metadata_props, and that normalisation."""
    return {**(metadata(start) if start is not None else {}), **image_norm_metadata(applied)}


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool = False) -> Path:
    """Write atomically; with external_data the weights (tensors of EXTERNAL_MIN_BYTES or more) go to
    `<name>.data` beside the model."""
    target = Path(path)
    if not external_data:
        with atomic_write(target) as tmp:
            onnx.save_model(model, os.fspath(tmp))
        return target
    data_name = f"{target.name}.data"
    # onnx writes external data next to the model under its final name, so save in a scratch folder
    # and move both files into place: the data first, then the model that refers to it.
    # The tensors are marked here rather than by save_model(save_as_external_data=True), which refuses
    # a location that exists relative to the working directory, not the model (a second prune to the
    # same output in the current folder failed).
    staged = onnx.ModelProto()  # marking tensors external rewrites the proto's initializers
    staged.CopyFrom(model)
    for tensor in _initializers(staged.graph):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
            external_data_helper.set_external_data(tensor, data_name)
    with atomic_write(target) as tmp_model, atomic_write(target.with_name(data_name)) as tmp_data:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            scratch_model = Path(scratch) / target.name
            onnx.save_model(staged, os.fspath(scratch_model))  # writes the marked tensors beside it
            os.replace(scratch_model, tmp_model)
            scratch_data = Path(scratch) / data_name
            if scratch_data.exists():  # absent when the model has no initializers: keep the empty file
                os.replace(scratch_data, tmp_data)
    return target


def _initializers(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """The graph's initializers and those of its subgraphs (If / Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in (
                [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
            ):
                yield from _initializers(subgraph)


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as a numpy array."""
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
