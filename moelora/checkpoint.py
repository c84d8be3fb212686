"""Reading and writing files safely: atomic folders, safetensors/JSON only, base-model fingerprints.

Nothing here unpickles: tensors are safetensors, everything else JSON. A folder is written under a
temporary name beside its destination and renamed into place only once complete, so a run killed
mid-write never leaves a half checkpoint where a good one was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class WriteError(CheckpointError):
    """A folder could not be written (e.g. the disk is full); names the outermost folder being saved."""

    def __init__(self, path: Path, reason: str):
        self.reason = reason
        super().__init__(f"cannot write {path}: {reason}; nothing was replaced (the partial folder was removed)")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder; on success it replaces `path` (the old one is removed only after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as exc:
        raise WriteError(path, exc.strerror or str(exc)) from None
    try:
        yield tmp
    except (OSError, WriteError) as exc:  # e.g. the disk filled up: the old folder is untouched, the partial one removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(path, exc.reason if isinstance(exc, WriteError) else exc.strerror or str(exc)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# What a killed save leaves beside its destination: `.<name>.tmp-*` (being written) or `.<name>.old-<pid>`.
ORPHAN_PATTERNS = (".*.tmp-*", ".*.old-*")


def write_json(path: Path, data) -> None:
    """Write JSON atomically (a temporary file renamed over `path`): readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from `path`; anything else (bad JSON, a list, a number) is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or infinity, or None: one host read when all are finite."""
    floats = [(k, v) for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not floats:
        return None
    device = floats[0][1].device
    ok = torch.stack([torch.isfinite(v).all().to(device) for _, v in floats]).cpu()
    if bool(ok.all()):
        return None
    return next(k for (k, _), good in zip(floats, ok.tolist()) if not good)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse pickle files and explain corrupt ones."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"refusing to load {path}: pickle checkpoints can run arbitrary code; "
                              "moelora only reads safetensors (convert it with safetensors.torch.save_file)")
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {exc}") from None


# --- base-model fingerprint ----------------------------------------------------------------------
_SAMPLES = 16  # values sampled per weight: enough to tell two random inits apart, cheap to compute


def fingerprint(model: torch.nn.Module) -> dict:
    """What identifies a base model: every parameter's name and shape, and sampled weight values.

    Shapes must match exactly; sampled values are compared with a tolerance so that the same
    weights loaded in another dtype (bf16 vs fp32) still match.
    """
    shapes = sorted((n, list(p.shape)) for n, p in _base_params(model))
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    samples = {}
    for name, p in _base_params(model):
        if p.dim() == 2 and len(samples) < 8:
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES)
            samples[name] = [round(float(v), 6) for v in flat[::step][:_SAMPLES].float()]
    return {"shapes_sha256": digest, "n_params": sum(p.numel() for _, p in _base_params(model)), "samples": samples}


def _base_params(model):
    """Base-model parameters under their original names (adapter parameters excluded)."""
    from .layer import AdapterLayer

    adapter = {id(p) for m in model.modules() if isinstance(m, AdapterLayer)
               for n, p in m.named_parameters() if not n.startswith("base_layer.")}
    for name, p in model.named_parameters():
        if id(p) not in adapter:
            yield name.replace(".base_layer.", "."), p


def check_fingerprint(expected: dict, model: torch.nn.Module, where: str) -> None:
    got = fingerprint(model)
    if expected.get("shapes_sha256") != got["shapes_sha256"] or expected.get("n_params") != got["n_params"]:
        raise CheckpointError(
            f"the adapter in {where} was trained on a different base model: parameter shapes differ "
            f"(expected {expected.get('n_params')} params / {expected.get('shapes_sha256')}, "
            f"got {got['n_params']} / {got['shapes_sha256']})")
    for name, values in expected.get("samples", {}).items():
        mine = got["samples"].get(name)
        if mine is None:
            continue
        a, b = torch.tensor(values), torch.tensor(mine)
        if not torch.allclose(a, b, rtol=2e-2, atol=1e-3 * float(a.abs().max()) + 1e-6):
            raise CheckpointError(
                f"the adapter in {where} was trained on a different base model: same shapes but the "
                f"weights of '{name}' differ (pass the base model named in {where}/manifest.json)")
