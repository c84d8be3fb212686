"""Training checkpoints: everything needed to continue a run exactly, in safetensors + JSON.

A checkpoint folder `checkpoint-<step>/` holds the adapter (a loadable adapter folder by itself),
`training_state.safetensors` (optimizer moments, torch RNG state) and `trainer_state.json` (step
counters, scheduler state, optimizer hyperparameters, Python/NumPy RNG state). It is written under a
temporary name and renamed when complete, so resume never picks up a half-written checkpoint.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_dir, load_tensors, read_json, save_tensors, write_json
from ..errors import CheckpointError, short_repr

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: Path, model, optimizer, scheduler, counters: dict, manifest: dict) -> None:
    """Write checkpoint folder `path` atomically (adapter + optimizer + scheduler + RNG + counters).

    `optimizer=None` (DeepSpeed, which shards the optimizer state across processes) saves everything
    but the optimizer moments; resuming such a checkpoint restarts them."""
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer) if optimizer is not None else ({}, None)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    py_state = random.getstate()
    np_state = np.random.get_state()
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / "adapter", manifest=manifest)
        save_tensors(tmp / STATE_TENSORS, opt_tensors)
        write_json(tmp / STATE_JSON, {
            "counters": counters,
            "scheduler": scheduler.state_dict(),
            "optimizer": opt_meta,
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]},
        })


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of checkpoint `path`, with every field load_checkpoint needs checked for type."""
    where = path / STATE_JSON
    meta = read_json(where, "trainer state")
    counters = meta.get("counters")
    if not isinstance(counters, dict) or not all(
            isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("step", "micro_step", "skipped_steps")):
        raise CheckpointError(f"trainer state {where}: 'counters' must hold non-negative integers step, "
                              f"micro_step and skipped_steps, got {short_repr(counters)}")
    rng = meta.get("rng")
    if not isinstance(meta.get("scheduler"), dict) or not (meta.get("optimizer") is None or isinstance(
            meta.get("optimizer"), dict)) or not isinstance(rng, dict) or not all(
            isinstance(rng.get(k), list) for k in ("python", "numpy")):
        raise CheckpointError(f"trainer state {where} is incomplete: it needs 'scheduler' and 'rng' objects "
                              "(and 'optimizer', or null), as save_checkpoint writes them")
    return meta


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint written by `save_checkpoint`; returns its counters."""
    meta = read_trainer_state(path)  # checked first: a malformed state never half-restores a model
    model.load_adapter_state_dict(*model.read_adapter_files(path / "adapter"))  # the files save_pretrained wrote
    tensors = load_tensors(path / STATE_TENSORS)
    try:
        if meta["optimizer"] is not None and optimizer is not None:
            _optimizer_from_flat(optimizer, tensors, meta["optimizer"])
        scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        py = meta["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npv = meta["rng"]["numpy"]
        np.random.set_state((npv[0], np.array(npv[1], dtype=np.uint32), npv[2], npv[3], npv[4]))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path}: its optimizer, scheduler or RNG state does not fit this run "
                              f"({type(exc).__name__}: {short_repr(str(exc))})") from None
    return meta["counters"]


def saved_training_config(path: Path) -> dict | None:
    """The run config a checkpoint was trained with (its adapter manifest's), or None if it has none."""
    manifest = path / "adapter" / "manifest.json"
    if not manifest.is_file():
        return None
    config = read_json(manifest, "checkpoint manifest").get("training_config")
    return config if isinstance(config, dict) else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders are never listed)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if (m := _CKPT.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(option, output_dir: Path) -> Path | None:
    """`resume_from_checkpoint` (true / path / None) -> the checkpoint folder to load, or None."""
    if option in (None, False):
        return None
    if option is True or option in ("true", "latest"):
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: no checkpoint in {output_dir}")
        return found[-1]
    path = Path(option)
    if not (path / STATE_JSON).is_file():
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a complete training checkpoint "
                              f"(no {STATE_JSON})")
    return path


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
