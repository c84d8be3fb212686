"""The optimizer step's health: its one host read, the check of the weights after an update, and the error a
non-finite step raises.

On a GPU every read of a device value makes the host wait until the queued work has run. The training loop
therefore keeps the forward's losses and checks on the device and reads them once per optimizer step, with the
gradient norm and the previous update's weight check, in one `tolist`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import TrainingError
from .state import list_checkpoints


@dataclasses.dataclass
class StepRead:
    finite: bool  # every process's losses and gradients are finite: the update may be applied
    weights_were_ok: bool  # every process's weights were finite after the previous update
    loss_finite: bool  # this process's forward losses are finite (an overflow only in the gradients is the scaler's)
    grad_norm: float | None  # total gradient norm before clipping (None where the engine does not report one)
    lm_losses: list[float]  # each micro-batch's share of the step's LM loss, in micro-batch order
    aux_losses: list[float]  # each micro-batch's router loss, where it was a tensor


def read_step(accelerator, norm, loss_ok: torch.Tensor, weights_ok: torch.Tensor,
              lms: list[torch.Tensor], auxes: list[torch.Tensor]) -> StepRead:
    """One host read for the step. `norm`: what clip_grad_norm_ returned (a tensor, a number or None);
    `loss_ok`, `weights_ok`: 0-d bool tensors on the device; `lms`, `auxes`: 0-d float tensors. With several
    processes the flags are summed over all of them first, so every process takes the same decision."""
    world = accelerator.num_processes
    norm = torch.as_tensor(norm, device=accelerator.device) if norm is not None else None
    grad_ok = torch.isfinite(norm) if norm is not None else torch.ones_like(weights_ok)
    flags = torch.stack([grad_ok.float() * loss_ok.float(), weights_ok.float()])
    if world > 1:
        flags = accelerator.reduce(flags, "sum")
    step_norm = norm.float() if norm is not None else flags.new_zeros(())
    read = torch.cat([flags, torch.stack([loss_ok.float(), step_norm] + lms + auxes)]).tolist()
    return StepRead(finite=read[0] == world, weights_were_ok=read[1] == world, loss_finite=read[2] == 1.0,
                    grad_norm=read[3] if norm is not None else None,
                    lm_losses=read[4:4 + len(lms)], aux_losses=read[4 + len(lms):])


def weights_finite(params):
    """A 0-dim bool tensor: every trainable weight is finite. One fused max-norm over all of them (NaN
    propagates through max, and a max cannot overflow as a sum of squares would); no host read here."""
    with torch.no_grad():
        tensors = [p.detach() for p in params if p.numel()]
        if not tensors:
            return torch.ones((), dtype=torch.bool)
        return torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))).max())


def non_finite_error(cfg, step: int, output_dir: Path, weights: bool = False, skipped: int = 0) -> TrainingError:
    """The one line a non-finite step stops the run with: what became non-finite, the last good checkpoint (kept),
    and what to change (fp16's range, or the learning rate)."""
    last = list_checkpoints(output_dir)
    kept = f"last good checkpoint: {last[-1] if last else 'none'}"
    if cfg.dtype == "float16" or cfg.mixed_precision == "fp16":
        why = ("float16's range ends at 65504, so activations or gradients can overflow at any learning rate; "
               "dtype=bfloat16 (or float32) has float32's range")
    else:
        why = "lower learning_rate (or max_grad_norm)"
    if weights:
        return TrainingError(f"the adapter's weights became non-finite (NaN/inf) in the update of step {step}; "
                             f"training stopped without saving them ({kept}); skipping steps cannot undo an "
                             f"update: {why}")
    if skipped:
        return TrainingError(f"{skipped} non-finite steps in a row (the last at step {step}): the run is diverging, "
                             f"skipping cannot help (nan_max_consecutive_skips={cfg.nan_max_consecutive_skips}); "
                             f"stopped without saving ({kept}); {why}")
    return TrainingError(f"non-finite loss or gradient at step {step}; training stopped without saving ({kept}). "
                         f"To avoid it: {why}; or set nan_policy=skip to drop such steps")
