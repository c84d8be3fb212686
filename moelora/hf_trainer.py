"""moelora inside `transformers.Trainer` and TRL's trainers, with nothing for the user's script to add.

What a Trainer needs from a model that is not a `PreTrainedModel` (read from transformers 5.x's Trainer),
and where each is provided:
  * the forward's signature (which dataset columns to keep, which are labels): `FORWARD_SIGNATURE`, set on
    `MoELoRAModel.forward`; `sample_labels` is not in it, so label_names stays ['labels'] and eval_loss exists;
  * a loss that is right under gradient accumulation: `MoELoRAModel.accepts_loss_kwargs = False`, so the
    Trainer divides each micro-batch's loss (LM mean + router loss) by the accumulation steps and router
    losses count once per optimizer step;
  * once per optimizer step, the routers' state (SMoRA's bias): a global optimizer step post-hook
    (`watch_optimizer_steps`) that updates every training moelora model whose parameters the optimizer
    holds; it also attaches `MoELoRACallback` to the Trainer that is driving the step, if any;
  * checkpoints: `MoELoRAModel.state_dict()` holds the adapter only (no tied base tensors to trip
    safetensors; Trainer's own resume loads it), and `MoELoRACallback.on_save` adds the moelora folder
    files, so each checkpoint-N also loads with `MoELoRAModel.from_pretrained`;
  * router metrics in the logs: `MoELoRACallback.on_log`;
  * TRL's fused LM head (`fused_lm_head=True` returns per-token log-probs): served by `fused_outputs`, since
    TRL's own patch would run the base backbone around moelora's forward (no padding mask for routers, no
    router loss).
Under DeepSpeed the optimizer holds flat partitions, not the model's parameters: the hook then finds the
Trainer on the call stack at the first optimizer step and adds the callback, whose on_step_end updates
the routers (from that first step on; nothing to add by hand there either).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import sys
import weakref
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.utils import ModelOutput

# What Trainer reads as the forward's parameters: the causal-LM inputs (columns it keeps) and `labels`.
FORWARD_SIGNATURE = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
       for n in ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "labels",
                 "use_cache", "cache_position", "logits_to_keep",
                 "media_mask", "images", "audio")]  # consumed by a model's encoders (moelora.multimodal.model)
    + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])



def trainer_signature(forward) -> inspect.Signature:
    """`FORWARD_SIGNATURE` plus a subclass forward's own named inputs (e.g. pixel_values), less the
    routing labels: Trainer counts every parameter named *label* as a label it needs for eval_loss."""
    params = list(FORWARD_SIGNATURE.parameters.values())
    known = {p.name for p in params}
    extra = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
             for p in inspect.signature(forward).parameters.values()
             if p.name not in known and "label" not in p.name
             and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    return FORWARD_SIGNATURE.replace(parameters=params[:-1] + extra + params[-1:])


_models: weakref.WeakSet = weakref.WeakSet()  # every MoELoRAModel created in this process
_hook_handle = None
_optimizer_models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> models it trains


def watch_optimizer_steps(model) -> None:
    """Update `model`'s router state after every optimizer step that trains it (registered once per process)."""
    global _hook_handle
    _models.add(model)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


def _models_of(optimizer) -> list:
    entry = _optimizer_models.get(optimizer)
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if entry is None or entry[0] != n_params:  # param groups may be added after the first step
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        models = [weakref.ref(m) for m in list(_models) if any(id(p) in ids for p in m.trainable_parameters())]
        entry = (n_params, models)
        _optimizer_models[optimizer] = entry
    return [m for ref in entry[1] if (m := ref()) is not None]


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    models = _models_of(optimizer)
    for model in models:
        if model.training:
            model.__dict__.pop("_router_state_current", None)  # this step's update is the hook's to make
            model.update_router_state()
            model.__dict__["_router_state_current"] = True  # a second call for this step is then a no-op
            if not getattr(model, "_trainer_checked", False):
                model._trainer_checked = True
                _attach_to_trainer()
    if not models and optimizer not in _optimizers_searched:
        # DeepSpeed's ZeRO optimizers step a torch optimizer over flat partitions, none of them a model's
        # parameter: the Trainer driving this step (if its model is a moelora one) gets the callback, whose
        # on_step_end then updates the routers once per optimizer step. Searched once per optimizer.
        _optimizers_searched.add(optimizer)
        _attach_to_trainer(only_for_moelora_models=True)


_optimizers_searched: weakref.WeakSet = weakref.WeakSet()  # optimizers that trained no watched model


def _attach_to_trainer(only_for_moelora_models: bool = False) -> None:
    """Give the Trainer running this step (found on the call stack) a `MoELoRACallback`, once."""
    # Only a script that imported Trainer can be running one (importing it here would cost seconds).
    if "transformers.trainer" not in sys.modules:
        return
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(60):  # DeepSpeed's step sits ~15 frames below Trainer.training_step
        if frame is None:
            return
        trainer = frame.f_locals.get("self")
        if isinstance(trainer, Trainer):
            if only_for_moelora_models and _core(trainer.model) is None:
                return
            callback_cls = __getattr__("MoELoRACallback")
            if not any(isinstance(c, callback_cls) for c in trainer.callback_handler.callbacks):
                trainer.add_callback(callback_cls())
            if getattr(trainer, "deepspeed", None) is not None:
                adapter_only_zero3_saves(trainer.deepspeed, _core(trainer.model))
            return
        frame = frame.f_back


def adapter_only_zero3_saves(engine, core) -> None:
    """Trainer's ZeRO-3 checkpoint (`model.safetensors`) from the adapter alone, as without DeepSpeed.

    Trainer saves a ZeRO-3 model through the engine's consolidated state dict, which gathers every module's
    tensors (PEFT models alone are spared the frozen ones): the whole base, and on tied-embedding bases two
    names for one tensor, which safetensors refuses. This engine instead gathers the adapter and returns
    `state_dict()`, the adapter-only dict every other Trainer checkpoint of this model holds."""
    if core is None or not engine.zero_optimization_partition_weights():
        return

    def consolidated_adapter_state(exclude_frozen_parameters: bool = False):
        with core.gathered_adapter():  # a collective: every process enters, the main one keeps the tensors
            if torch.distributed.get_rank() != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}

    engine._zero3_consolidated_16bit_state_dict = consolidated_adapter_state


def _core(model):
    """The MoELoRAModel inside whatever wraps it (DDP, torch.compile, accelerate)."""
    from .model import MoELoRAModel

    seen = 0
    while not isinstance(model, MoELoRAModel) and seen < 8:
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return model if isinstance(model, MoELoRAModel) else None


def __getattr__(name):
    """`MoELoRACallback` is built on first use: importing transformers' Trainer machinery (and PEFT through
    it) takes seconds, which `import moelora` should not pay."""
    if name != "MoELoRACallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if "MoELoRACallback" not in globals():
        globals()["MoELoRACallback"] = _build_callback()
    return globals()["MoELoRACallback"]


def _build_callback():
    from transformers import TrainerCallback

    class MoELoRACallback(TrainerCallback):
        """Router state per optimizer step (where the optimizer hook cannot see the parameters), router
        metrics in the logs, and moelora adapter files in every checkpoint folder."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            core = _core(model)
            if core is not None:
                core.update_router_state()  # a no-op when the optimizer hook already did it for this step

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            from .training.metrics import summarise_router_stats

            core = _core(model)
            if core is None or logs is None:
                return
            stats = {name: s for name, s in core.router_stats().items() if s.get("tokens", 1) > 0}  # not empty
            metrics = summarise_router_stats(stats)
            if not metrics:
                return
            prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
            metrics = {prefix + k: v for k, v in metrics.items()}
            logs.update(metrics)  # for the reporters that run after this callback
            if state.log_history:
                state.log_history[-1].update(metrics)  # Trainer appended this entry just before on_log
            core.reset_router_stats()

        def on_save(self, args, state, control, model=None, **kwargs):
            core = _core(model)
            if core is None:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with core.gathered_adapter():  # a collective under ZeRO-3/FSDP2: every process enters
                if args.should_save and folder.is_dir():
                    add_adapter_files(core, folder)

    MoELoRACallback.__module__, MoELoRACallback.__qualname__ = __name__, "MoELoRACallback"
    return MoELoRACallback


def add_adapter_files(model, folder: Path) -> None:
    """Write the moelora adapter files into an existing folder (a Trainer checkpoint), each moved in whole."""
    staging = folder / ".moelora-adapter"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    for item in staging.iterdir():
        target = folder / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


@dataclasses.dataclass
class FusedLMOutput(ModelOutput):
    """The fields TRL's trainers read from a `fused_lm_head=True` forward."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def fused_outputs(out, labels: torch.Tensor, num_items_in_batch, aux: torch.Tensor | None):
    """TRL's `fused_lm_head=True` outputs (per-token log_probs, entropy, is_top1, label_mask, loss) from the
    logits of moelora's own forward.

    TRL builds its loss as -sum(log_probs) / (num_items_in_batch or the valid-token count) and ignores
    `loss`; the router loss reaches it through the log-probs with zero value change: every valid token's
    log-prob gets -(aux - aux.detach()), so the loss gains aux per micro-batch mean, exactly as Trainer's."""
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    mask = target != -100
    logp_all = torch.log_softmax(logits, dim=-1)
    log_probs = logp_all.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if aux is not None:
        log_probs = log_probs - (aux - aux.detach())
    log_probs = log_probs.masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = (-(logp_all.exp() * logp_all).sum(-1)).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(-1) == target) & mask
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / denom
    return FusedLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask,
                         aux_loss=aux)
