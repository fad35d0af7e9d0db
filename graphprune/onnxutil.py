"""The one place for small ONNX and file helpers: opset lookup, node attributes, atomic writes, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx

# The opset assumed when a model declares none for the default domain.
DEFAULT_OPSET = 13


def opset_of(model: onnx.ModelProto) -> int:
    """The model's opset for the default ONNX domain."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """A node attribute's value, or `default` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds (with the
    permissions a plainly created file would get)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        plain_permissions(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def plain_permissions(path: str | os.PathLike[str]) -> None:
    """Give a file the permissions a plainly created one gets (0666 less the umask): temporary files
    and onnx's external-data writer use 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (identifies the model a plan was made for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def conv_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv, by node name (names survive pruning)."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    return {
        n.name: dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dims
    }
