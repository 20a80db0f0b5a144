"""Model weights on disk: safetensors, written atomically, checksummed.

A checkpoint is ``<path>`` (safetensors, tensors only, never pickle) plus
``<path>.sha256`` (hex digest of the file). Writing goes to a temporary file in
the same directory and is renamed into place, so a killed process never leaves
a half-written checkpoint under the final name. Loading verifies the digest and
raises :class:`CheckpointError` naming the path when it does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match its checksum."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _test_write_delay(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _test_write_delay(path: Path) -> None:
    """TEST-ONLY: ``DASS_RAY_TEST_WRITE_DELAY=<substring>:<seconds>`` sleeps between writing the
    temporary file and renaming it, for writes whose path contains ``<substring>``, so a test
    can kill a process while it is writing (tests/test_reliability.py). Unset: no effect."""
    spec = os.environ.get("DASS_RAY_TEST_WRITE_DELAY")
    if spec and ":" in spec:
        pattern, seconds = spec.rsplit(":", 1)
        if pattern and pattern in str(path):
            import time

            time.sleep(float(seconds))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_state` with ``keep_previous`` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None,
               keep_previous: bool = False) -> str:
    """Save a state dict as safetensors at ``path`` atomically; return its sha256.

    ``keep_previous``: the checkpoint being replaced (with its checksum) is kept as
    :func:`previous_path`, the fallback of :func:`load_latest`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_previous and path.is_file() and Path(str(path) + ".sha256").is_file():
        prev = previous_path(path)
        Path(str(prev) + ".sha256").unlink(missing_ok=True)  # never a new file beside an old checksum
        os.replace(path, prev)
        os.replace(str(path) + ".sha256", str(prev) + ".sha256")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (meta or {}).items()})
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_text(str(path) + ".sha256", digest + "\n")
    return digest


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a checkpoint written by :func:`save_state`, verifying its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    side = Path(str(path) + ".sha256")
    if not side.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no checksum file {side.name!r} (incomplete write?)")
    want = side.read_text().strip()
    got = sha256_file(path)
    if got != want:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: sha256 {got[:12]}... != recorded {want[:12]}...")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {e}") from e


def load_latest(path: str | os.PathLike, log=print) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Load ``path``, or when it is missing or corrupted the previous checkpoint kept beside it.

    Returns ``(tensors, metadata, the path used)``. A bad ``path`` is reported through
    ``log`` by path; :class:`CheckpointError` (naming both) when neither verifies.
    """
    path = Path(path)
    errors = []
    for p in (path, previous_path(path)):
        try:
            state = load_state(p)
            meta = read_meta(p)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            log(f"WARNING: {errors[0]}; using the previous checkpoint {str(p)!r}")
        return state, meta, p
    raise CheckpointError("; ".join(errors))


def checkpoint_id(path: str | os.PathLike) -> str:
    """A short id of a checkpoint (its recorded sha256 prefix), for provenance columns."""
    side = Path(str(path) + ".sha256")
    if side.is_file():
        return side.read_text().strip()[:16]
    return sha256_file(path)[:16]


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimizer's state into tensors + a JSON string (safetensors holds tensors only)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}{pid}.{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], blob: str, prefix: str = "opt.") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    meta = json.loads(blob)
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if not key.startswith(prefix):
            continue
        pid, name = key[len(prefix):].split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def read_meta(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
