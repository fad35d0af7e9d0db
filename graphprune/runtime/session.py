"""onnxruntime sessions for graphprune, and seeded inputs to feed them.

Every place that runs a model (shape discovery, activation capture, verification, benchmarking) goes
through `make_session`, so provider selection, threading and the handling of external weight files
live in one spot.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from graphprune.errors import GraphPruneError, InvalidModelError, UnsupportedModelError

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike[str]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Protobuf refuses to serialise a message of 2 GiB or more; such models must go through a file.
_PROTO_LIMIT = 2**31 - 1
# Lets onnxruntime resolve external-data locations when the model itself is given as bytes.
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def make_session(
    model_or_path: ModelLike,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    extra_outputs: Iterable[str] = (),
    profile_prefix: str | os.PathLike[str] | None = None,
) -> ort.InferenceSession:
    """Open an onnxruntime session on a ModelProto or an .onnx path.

    provider: "cpu" or "cuda" (CUDA with CPU fallback for ops it lacks). threads: intra-op threads
    (None: onnxruntime's default). extra_outputs: names of intermediate tensors to fetch as well; they
    are added as graph outputs on a copy, never on the caller's model or file. Models stored with
    external data work when given as a path (weights are read from beside the file). profile_prefix:
    record onnxruntime's per-node profile to a file starting with it (`end_profiling()` names it).
    """
    options = _session_options(threads)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    providers = _providers(provider)
    extra = list(dict.fromkeys(extra_outputs))
    if isinstance(model_or_path, onnx.ModelProto):
        label = model_or_path.graph.name or "<in-memory model>"
        if extra:
            _check_extra_outputs(model_or_path, extra, label)
        session = _session_from_proto(model_or_path, extra, options, providers, label)
    else:
        path = Path(model_or_path)
        label = str(path)
        if not path.is_file():
            raise InvalidModelError(f"Model file {path} does not exist; check the path.")
        if extra:
            # Weights stay on disk: only the (small) graph is loaded, edited and handed over as bytes.
            proto = _load_graph_only(path)
            _check_extra_outputs(proto, extra, label)
            options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(path.resolve().parent))
            session = _create(_with_outputs(proto, extra), options, providers, label)
        else:
            session = _create(str(path), options, providers, label)
    if provider == "cuda" and session.get_providers()[0] != _PROVIDERS["cuda"]:
        raise GraphPruneError(
            f"onnxruntime fell back to {session.get_providers()[0]} for {label} because CUDA could not be "
            f"initialised: onnxruntime-gpu {ort.__version__} needs the CUDA and cuDNN major versions it was "
            "built for (1.31: CUDA 13, cuDNN 9; pip install 'onnxruntime-gpu[cuda,cudnn]' brings them, as "
            "does a matching PyTorch in the same environment)."
        )
    return session


def input_feed(
    model: ModelLike, batch: int = 1, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input of `model` (initialisers listed as inputs are skipped).

    A symbolic or unknown first dimension becomes `batch`; any other symbolic dimension takes its size
    from `shapes` (by input name), else 1 (the smallest input: give `shapes` for dynamic H/W).
    Float inputs are standard normal, integer inputs uniform in [0, 8), booleans fair coin flips.
    """
    proto = model if isinstance(model, onnx.ModelProto) else _load_graph_only(Path(model))
    initialisers = {init.name for init in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for value in proto.graph.input:
        if value.name in initialisers:
            continue
        if not value.type.HasField("tensor_type"):
            raise UnsupportedModelError(
                f"Graph input {value.name!r} is not a tensor, so graphprune cannot generate data for it."
            )
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = _concrete_shape(tensor_type, batch, (shapes or {}).get(value.name))
        if np.issubdtype(dtype, np.floating):
            feed[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[value.name] = rng.integers(0, 8, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feed[value.name] = rng.random(shape) < 0.5
        else:
            raise UnsupportedModelError(
                f"Graph input {value.name!r} has element type {dtype}, which graphprune cannot generate data for."
            )
    return feed


def _concrete_shape(
    tensor_type: onnx.TypeProto.Tensor, batch: int, given: tuple[int, ...] | None
) -> tuple[int, ...]:
    """Resolve symbolic dims: the leading one to `batch`, the others to `given`'s sizes, else 1."""
    if not tensor_type.HasField("shape"):
        raise UnsupportedModelError("A graph input has no shape at all, so its rank is unknown; give it one.")
    dims = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(dim.dim_value)
        else:
            dims.append(batch if axis == 0 else given[axis] if given and axis < len(given) else 1)
    return tuple(dims)


def _session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: exporter quirks otherwise flood the log with warnings
    if threads is not None:
        if threads < 1:
            raise GraphPruneError(f"Thread count {threads} is invalid; pass a positive number or None.")
        options.intra_op_num_threads = threads
    return options


def _providers(provider: str) -> list[str]:
    if provider not in _PROVIDERS:
        raise GraphPruneError(f"Provider {provider!r} is unknown; use one of {sorted(_PROVIDERS)}.")
    if provider == "cpu":
        return [_PROVIDERS["cpu"]]
    if _PROVIDERS["cuda"] not in ort.get_available_providers():
        raise GraphPruneError(
            "The installed onnxruntime has no CUDAExecutionProvider; replace it with the GPU build (both "
            "provide the module onnxruntime): pip uninstall -y onnxruntime && pip install 'graphprune[gpu]', "
            "or, with the CUDA 13 libraries it needs, pip uninstall -y onnxruntime && pip install "
            "'onnxruntime-gpu[cuda]==1.31.1'; or use provider 'cpu'."
        )
    return [_PROVIDERS["cuda"], _PROVIDERS["cpu"]]


def _load_graph_only(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise InvalidModelError(
            f"Model file {path} could not be read as ONNX ({exc}); check the file."
        ) from exc


def _check_extra_outputs(model: onnx.ModelProto, names: list[str], label: str) -> None:
    produced = {out for node in model.graph.node for out in node.output}
    missing = [name for name in names if name not in produced]
    if missing:
        raise GraphPruneError(
            f"Tensors {missing} requested as extra outputs are not produced by any node of {label}; "
            "use names of node outputs."
        )


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    """Serialise `model` with `names` appended as graph outputs, without copying the model.

    Concatenated protobuf messages parse as their merge, and merging appends repeated fields, so
    appending a tiny ModelProto whose graph only lists the new outputs adds them to the graph.
    """
    extra = onnx.ModelProto(graph=onnx.GraphProto(output=_new_outputs(model, names)))
    return model.SerializeToString() + extra.SerializeToString()


def _new_outputs(model: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    """Untyped output entries (onnxruntime infers their types) for names not already graph outputs."""
    present = {out.name for out in model.graph.output}
    return [onnx.ValueInfoProto(name=name) for name in names if name not in present]


def _session_from_proto(
    model: onnx.ModelProto,
    extra: list[str],
    options: ort.SessionOptions,
    providers: list[str],
    label: str,
) -> ort.InferenceSession:
    if model.ByteSize() < _PROTO_LIMIT:
        return _create(_with_outputs(model, extra), options, providers, label)
    # Too big for one protobuf message: write it with external data to a scratch folder. onnxruntime
    # has read (or mapped) the weights once the session exists, so the folder can go right after.
    log.info("Model %s is over 2 GiB; staging it with external data for onnxruntime.", label)
    with tempfile.TemporaryDirectory(prefix="graphprune-") as folder:
        staged = onnx.ModelProto()
        staged.CopyFrom(model)  # saving with external data rewrites the proto; keep the caller's intact
        staged.graph.output.extend(_new_outputs(model, extra))
        path = Path(folder) / "model.onnx"
        onnx.save(staged, str(path), save_as_external_data=True, location="model.onnx.data")
        return _create(str(path), options, providers, label)


def _create(
    model: str | bytes, options: ort.SessionOptions, providers: list[str], label: str
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped pybind errors
        if "INVALID_PROTOBUF" in str(exc):
            raise InvalidModelError(f"{label}: not a readable ONNX model ({exc}).") from exc
        raise InvalidModelError(
            f"onnxruntime cannot run {label} ({exc}); an op it does not implement (a custom domain?) "
            "cannot be analysed or verified here."
        ) from exc
