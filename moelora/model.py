"""`MoELoRAModel`: a frozen HF causal LM with one method's adapter layers injected (DESIGN §2).

    model = get_moelora_model(base, SMoRAConfig(r=64, k=8))   # freeze, inject, wrap
    model.save_pretrained("out/")                              # moelora_config.json + safetensors + manifest
    model = MoELoRAModel.from_pretrained(base, "out/")         # also reads plain PEFT LoRA folders
    model, tokenizer = load("out/")                            # base resolved from the manifest

The wrapper forwards everything else (generate, config, gradient checkpointing) to the base model.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .adapter_folder import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, is_moelora_folder, read_moelora_folder
from .checkpoint import atomic_dir, first_non_finite, fingerprint, load_tensors, read_json, save_tensors, write_json
from .config import suggest
from .errors import CheckpointError, ConfigError, DataError, MoeloraError, short_repr
from .layer import (AdapterLayer, RoutingContext, adapter_dtype_for, layer_sites, linear_dims, own_modules,
                    router_buffers_to_fp32)
from .peft_compat import read_adapter_config
from .registry import config_from_dict, get_method, get_peft_importer, peft_exporter
from .hf_trainer import FORWARD_SIGNATURE, fused_outputs, trainer_signature, watch_optimizer_steps
from .fsdp import fsdp_units, gathered_fsdp
from .supervised_loss import HeadRows, supervised_loss
from .targets import find_targets, resolve_default_targets  # noqa: F401  (find_targets: public here too)


def check_token_ids(input_ids, vocab: int) -> None:
    """An id outside the vocabulary would fail deep inside the embedding with an opaque index error (on a GPU,
    a device-side assert). One read by the host (a GPU sync for a GPU tensor, none for a CPU batch)."""
    if not torch.is_tensor(input_ids) or input_ids.numel() == 0:
        return
    low, high = torch.aminmax(input_ids)
    if bool((low < 0) | (high >= vocab)):
        low, high = int(low), int(high)
        raise DataError(f"input_ids holds token id {high if high >= vocab else low}, outside the model's "
                        f"vocabulary of {vocab} (is the tokenizer the base model's own?)")


def _argument_names(fn) -> tuple[str, ...]:
    """The parameters a function's code declares (not its __signature__, which functools.wraps copies)."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] if code is not None else ()


class MoELoRAModel(nn.Module):
    """A base causal LM whose target projections are `AdapterLayer`s of one method."""

    # transformers.Trainer: divide each micro-batch's loss by the accumulation steps instead of passing
    # num_items_in_batch, so router losses (per micro-batch means) count once per optimizer step
    accepts_loss_kwargs = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:  # what Trainer reads: keep columns, labels = ['labels'] (hf_trainer.py)
            cls.forward.__signature__ = trainer_signature(cls.forward)

    def __setattr__(self, name, value):
        # TRL replaces model.forward with a fused LM head that runs the base backbone around this forward;
        # moelora serves fused_lm_head=True itself (routers keep the padding mask, router losses count).
        if name == "forward" and "fused_lm_head" in _argument_names(value):
            return
        super().__setattr__(name, value)

    def train(self, mode: bool = True):
        if mode:
            watch_optimizer_steps(self)  # router state updates after each optimizer step that trains this model
        return super().train(mode)

    @property
    def media_tokens(self) -> dict[str, int] | None:
        """Placeholder tokens per image / audio clip when this model owns encoders (None: text only)."""
        encoders = self._modules.get("encoders")
        return encoders.media_tokens if encoders is not None else None

    @property
    def encoder_config(self):
        """The `moelora.multimodal.EncoderConfig` of this model's encoders (None: text only)."""
        encoders = self._modules.get("encoders")
        return encoders.config if encoders is not None else None

    def attach_encoders(self, config, pretrained_trained: dict | None = None) -> nn.Module:
        """Give this model image/audio encoders (`moelora.multimodal.model`): any method's model can own them."""
        from .multimodal.model import attach_encoders

        return attach_encoders(self, config, pretrained_trained)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (adapter layers inside), as PEFT's method of the same name."""
        return self.base_model

    # A checkpoint of this model is its adapter: state_dict() holds what save_pretrained saves (under module
    # paths), not the frozen base, so Trainer checkpoints are adapter-sized, tied embeddings never reach
    # safetensors twice, and Trainer's resume (load_state_dict, strict=False) restores the adapter.
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + k for k in self.checkpoint_keys()}
        for key in [k for k in full if k.startswith(prefix) and k not in keep]:
            del full[key]
        return full

    def checkpoint_keys(self) -> list[str]:
        """Module-path names of what a checkpoint holds: adapter tensors and whatever else trains."""
        layers = {f"base_model.{name}.": layer for name, layer in self.adapter_layers().items()}
        keys = [f"{p}{k}" for p, layer in layers.items() for k in layer.state_dict() if not k.startswith("base_layer.")]
        if "encoders" in self._modules:  # frozen encoders too: a checkpoint holds every saved encoder tensor
            keys += [f"encoders.{k}" for k in self.encoders.saved_state_dict()]
        keys += [n for n, p in self.named_parameters() if p.requires_grad and n not in keys]
        return keys

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a `state_dict()` (adapter only): base weights may be absent, every adapter tensor must be there."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in set(self.checkpoint_keys())]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(f"state dict does not fit this model: missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]}")
        return type(result)(missing, result.unexpected_keys)

    def __init__(self, base_model: nn.Module, method_config, base_model_id: str | None = None):
        super().__init__()
        self.base_model = base_model
        # target_modules None: the architecture's default, resolved here so the saved config names it
        self.method_config = method_config = resolve_default_targets(base_model, method_config)
        self.base_model_id = base_model_id or getattr(getattr(base_model, "config", None), "_name_or_path", "") or ""
        self.base_fingerprint = fingerprint(base_model)
        self.context = RoutingContext()
        method = get_method(method_config.method_name)
        for p in base_model.parameters():
            p.requires_grad_(False)
        # Each layer is told where it sits when it is built, so a method may size its bank by it (per-block counts).
        for site in layer_sites(base_model, find_targets(base_model, method_config.target_modules)):
            parent_name, _, child = site.name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, method.layer_cls(getattr(parent, child), method_config, self.context, site))
        for layer in self.adapter_layers().values():
            self.place_adapter(layer, like=layer.base_layer.weight)
        self.head_rows = HeadRows(base_model.get_output_embeddings())  # forward(supervised_positions=...)

    # --- adapter precision ------------------------------------------------------------------
    def place_adapter(self, module: nn.Module, like: torch.Tensor) -> nn.Module:
        """Put `module`'s own trainable tensors (an adapter layer's, skipping its `base_layer`, or a model-level
        router/encoder's) on `like`'s device in the adapter dtype; floating buffers (router state such as SMoRA's
        beta and counts) go to fp32 whatever the policy: they accumulate steps far below 16-bit resolution."""
        dtype = adapter_dtype_for(self.method_config, like.dtype)
        for _, sub in own_modules(module):
            for key, p in sub.named_parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(device=like.device, dtype=dtype)
        router_buffers_to_fp32(module, like.device)
        if isinstance(module, AdapterLayer):
            module.adapter_dtype = dtype
        return module

    def router_state_to_fp32(self) -> None:
        """Undo a whole-model cast of the router buffers (DeepSpeed's bf16/fp16 engine casts every buffer)."""
        for layer in self.adapter_layers().values():
            router_buffers_to_fp32(layer)

    # --- delegation -------------------------------------------------------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, attention_mask: torch.Tensor | None = None, sample_labels: torch.Tensor | None = None,
                **kwargs):
        """The base model's forward. `sample_labels` ([batch] ints, e.g. task ids) reach routers that route
        by label. Router losses that layers add (e.g. LoRA-Mixer's SBL) are summed into `aux_loss` and,
        when the LM loss is computed (labels given), added to `loss`. `fused_lm_head=True` (TRL) returns
        per-token log-probs instead of logits (moelora/hf_trainer.py)."""
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        positions = kwargs.pop("supervised_positions", None)  # LM head only where the loss is (supervised_loss.py)
        # Routers read the padding mask from the shared context; it stays set for the backward
        # pass so gradient-checkpoint recomputation routes exactly as the forward did. `labels` mark the
        # prompt (-100 positions) for routers that route from it (RoutingContext.prompt_mask).
        self.context.start_forward(attention_mask, sample_labels, labels=kwargs.get("labels"))
        self._check_token_ids(kwargs.get("input_ids", args[0] if args else None))
        if positions is not None and kwargs.get("labels") is not None and self.head_rows.installed:
            labels, num_items = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
            self.head_rows.rows = positions
            try:
                out = self.base_model(*args, attention_mask=attention_mask, **kwargs)
            finally:
                self.head_rows.rows = None
            out["loss"] = supervised_loss(out.logits, labels, positions, num_items)
        else:
            out = self.base_model(*args, attention_mask=attention_mask, **kwargs)
        if self.context.aux_losses:
            aux = torch.stack(self.context.aux_losses).sum()
            out["aux_loss"] = aux
            if out.get("loss") is not None:
                out["loss"] = out["loss"] + aux
        if fused_lm_head:
            return fused_outputs(out, kwargs.get("labels"), kwargs.get("num_items_in_batch"), out.get("aux_loss"))
        return out

    # True where the caller checks every batch's ids on the host before moving it to the device (train.py): then
    # the forward does not read the device copy, a GPU sync per micro-batch.
    token_ids_checked_by_caller = False

    def _check_token_ids(self, input_ids) -> None:
        # Not while compiling either: the host read would break the graph.
        if not self.token_ids_checked_by_caller and not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.base_model.get_input_embeddings().num_embeddings)

    def generate(self, *args, attention_mask: torch.Tensor | None = None, sample_labels: torch.Tensor | None = None,
                 **kwargs):
        args, kwargs, sample_labels = self.media_generation_inputs(args, kwargs, sample_labels)
        self.context.start_forward(attention_mask, sample_labels, generating=True)
        return self.base_model.generate(*args, attention_mask=attention_mask, **kwargs)

    def media_generation_inputs(self, args: tuple, kwargs: dict, sample_labels):
        """(args, kwargs, sample_labels) for a decoder: with encoders, media_mask/images/audio become
        `inputs_embeds` beside the ids (and routing labels, for a method that routes by modality)."""
        if "encoders" not in self._modules:
            return args, kwargs, sample_labels
        from .multimodal.model import generation_inputs

        return generation_inputs(self, args, kwargs, sample_labels)

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant activation checkpointing on the base model (works although its inputs are frozen).

        Routers count each token once: recomputation inside backward is not counted (`in_backward`). Compiled,
        dynamo refuses side effects inside a checkpointed region unless told that, as here, they must happen
        once, in the forward, and not again in the recomputation: exactly the router bookkeeping's rule."""
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        kwargs = {"use_reentrant": False}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # transformers also makes the embeddings' output require grad, which only reentrant checkpointing needs;
        # a compiled graph cannot return such a tensor (an intermediate with requires_grad_ set).
        if hasattr(self.base_model, "disable_input_require_grads"):
            self.base_model.disable_input_require_grads()

    # --- adapter bookkeeping ----------------------------------------------------------------
    def adapter_layers(self) -> dict[str, AdapterLayer]:
        return {m.layer_name: m for m in self.base_model.modules() if isinstance(m, AdapterLayer)}

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside this block (e.g. to evaluate the base on the same object): adapters
        and encoders off. On exit each is as it was (an align-stage run keeps its adapters off throughout)."""
        switches = [(layer, "adapter_enabled") for layer in self.adapter_layers().values()]
        if "encoders" in self._modules:
            switches.append((self.encoders, "enabled"))
        before = [getattr(obj, attr) for obj, attr in switches]
        for obj, attr in switches:
            setattr(obj, attr, False)
        try:
            yield self
        finally:
            for (obj, attr), value in zip(switches, before):
                setattr(obj, attr, value)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def router_stats(self) -> dict[str, dict]:
        """Per adapted layer: load fraction per expert/rank, load and gate entropy, dead experts."""
        return {name: s for name, layer in self.adapter_layers().items() if (s := layer.stats()) is not None}

    def reset_router_stats(self) -> None:
        for layer in self.adapter_layers().values():
            layer.reset_stats()

    @torch.no_grad()
    def update_router_state(self, apply: bool = True) -> None:
        """Once per optimizer step: all-reduce every router's pending counts, then update its state.
        `apply=False` drops the pending counts instead (a skipped step must not move the routers)."""
        # Once per step when called twice (the optimizer hook, then train.py or a Trainer callback): the call
        # after the hook's has nothing new to count, so it skips, all-reduce included (every process alike).
        if self.__dict__.pop("_router_state_current", False):
            return
        pending = [(layer, c) for layer in self.adapter_layers().values() if (c := layer.step_counts()) is not None]
        if not pending:
            return
        if not apply:
            for layer, c in pending:
                layer.apply_step(torch.zeros_like(c))
            return
        flat = torch.cat([c.reshape(-1) for _, c in pending])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flat)  # one collective for all layers
        for (layer, c), part in zip(pending, flat.split([c.numel() for _, c in pending])):
            layer.apply_step(part.view_as(c))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter parameters and saved buffers (e.g. SMoRA's bias), keyed by layer name."""
        out = {}
        for name, layer in self.adapter_layers().items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    out[f"{name}.{key}"] = value
        if "encoders" in self._modules:  # image/audio encoders + projectors (pretrained backbones if trained)
            out.update({f"encoders.{k}": v for k, v in self.encoders.saved_state_dict().items()})
        return out

    @contextlib.contextmanager
    def gathered_adapter(self):
        """Inside this block the adapter's full tensors are present on this process.

        Under DeepSpeed ZeRO-3 every process holds a shard of each parameter; gathering them is a
        collective, so every process must enter this block (only one needs to write files inside)."""
        # Everything a checkpoint holds: adapter tensors (trainable or frozen experts) and whatever else
        # trains with them (routers, multimodal encoders).
        saved = {id(p): p for layer in self.adapter_layers().values() for n, p in layer.named_parameters()
                 if not n.startswith("base_layer.")}
        saved.update({id(p): p for p in self.parameters() if p.requires_grad})
        if "encoders" in self._modules:  # frozen encoders are saved too
            saved.update({id(p): p for p in self.encoders.parameters()})
        sharded = [p for p in saved.values() if hasattr(p, "ds_id")]
        if fsdp_units(self):  # FSDP2 (fully_shard): the saved parameters as full tensors, for the block
            with gathered_fsdp(self, {id(p) for p in saved.values()}):
                yield self
            return
        if not sharded:
            yield self
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
            yield self

    def adapter_buffers(self) -> dict[str, torch.Tensor]:
        """Saved router state that is not trained by gradients (e.g. SMoRA's bias), keyed by layer name."""
        out = {}
        for name, layer in self.adapter_layers().items():
            for key, value in layer.named_buffers():
                if not key.startswith("base_layer.") and key not in layer._non_persistent_buffers_set:
                    out[f"{name}.{key}"] = value
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "checkpoint",
                                allow_non_finite: bool = False) -> None:
        """Copy saved adapter tensors in. NaN/inf weights are refused: they only ever come from a diverged
        run and would generate garbage silently; `allow_non_finite=True` loads them anyway, for forensics."""
        if not allow_non_finite and (bad := first_non_finite(tensors)) is not None:
            raise CheckpointError(f"{where}: tensor '{bad}' holds NaN or infinite values (a diverged run); "
                                  "refusing to load it (allow_non_finite=True loads it for inspection)")
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{where} does not fit this model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                  f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} "
                                  "(different target_modules or method?)")
        with torch.no_grad():
            for key, value in tensors.items():
                if own[key].shape != value.shape:
                    raise CheckpointError(f"{where}: tensor '{key}' has shape {list(value.shape)}, "
                                          f"this model expects {list(own[key].shape)}")
                own[key].copy_(value.to(own[key].dtype))

    def merge_and_unload(self) -> nn.Module:
        """Fold constant-gate adapters (LoRA) into W0 and return the plain base model."""
        for name, layer in self.adapter_layers().items():
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.merge())
        return self.base_model

    # --- save / load ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, format: str = "moelora", dtype: torch.dtype | None = None,
                        manifest: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter atomically. `format="peft"` writes a folder PEFT's LoRA loads (LoRA only);
        `dtype` stores the tensors in another precision (e.g. torch.bfloat16 for released checkpoints);
        `state` is an `adapter_state_dict()` taken earlier (e.g. gathered from ZeRO-3 shards)."""
        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                   for k, v in (state if state is not None else self.adapter_state_dict()).items()}
        if (bad := first_non_finite(tensors)) is not None:  # checked after the cast: fp16 can overflow to inf
            raise CheckpointError(f"refusing to save a non-finite adapter to {path}: tensor '{bad}' holds NaN "
                                  "or infinite values (the run diverged)")
        info = {"base_model": self.base_model_id, "base_fingerprint": self.base_fingerprint,
                "moelora_version": __version__, "method": self.method_config.method_name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(manifest or {})}
        with atomic_dir(path) as tmp:
            if format == "peft":  # the method's own PEFT writer (registry); refused for methods without one
                peft_exporter(self.method_config.method_name)(self, tensors, tmp)
            elif format == "moelora":
                self.write_adapter_files(tmp, tensors)
            else:
                raise ValueError(f"save_pretrained: format must be 'moelora' or 'peft', got {format!r}")
            write_json(tmp / MANIFEST_NAME, info)

    # Hooks of the moelora folder format; subclasses that keep more than adapter tensors (the encoders of
    # multimodal models) or split them into other files (per-modality PEFT folders) override them.
    def saved_config(self) -> dict:
        """What moelora_config.json holds: enough to rebuild an empty model of this kind."""
        out = {"method": self.method_config.method_name, "moelora_version": __version__,
               "config": self.method_config.to_dict()}
        if "encoders" in self._modules:  # "encoders": their config (+ "pretrained_encoders": folder, trained)
            out.update(self.encoders.saved_config())
        return out

    def write_adapter_files(self, folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        write_json(folder / CONFIG_NAME, self.saved_config())
        save_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "moelora"})

    def read_adapter_files(self, folder: Path) -> tuple[dict[str, torch.Tensor], str]:
        """(tensors keyed as `adapter_state_dict`, where they came from) of a folder `write_adapter_files` wrote."""
        return load_tensors(folder / WEIGHTS_NAME), str(folder / WEIGHTS_NAME)

    @classmethod
    def from_saved_config(cls, base_model: nn.Module, cfg, base_model_id: str | None, meta: dict) -> MoELoRAModel:
        """An untrained model for the config `saved_config` wrote (multimodal ones rebuild their encoders)."""
        model = cls(base_model, cfg, base_model_id)
        if meta.get("encoders") is not None:
            from .multimodal.model import saved_encoder_config

            model.attach_encoders(*saved_encoder_config(meta))
        return model

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | Path, base_model_id: str | None = None,
                        is_trainable: bool = False, allow_non_finite: bool = False) -> MoELoRAModel:
        """Load a moelora adapter folder, or a PEFT LoRA folder, onto `base_model`. An adapter holding
        NaN/inf weights is refused unless `allow_non_finite=True` (for inspecting a diverged run)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"adapter folder not found: {path}")
        if is_moelora_folder(path):
            saved = read_moelora_folder(path, base_model)
            model_cls = get_method(saved.method).model_cls or cls
            model = model_cls.from_saved_config(base_model, saved.config, base_model_id or saved.manifest.get("base_model"),
                                                saved.meta)
            model.load_adapter_state_dict(*model.read_adapter_files(path), allow_non_finite=allow_non_finite)
        elif (path / "adapter_config.json").is_file():
            # What a PEFT folder loads as is registered by the methods, by peft_type (LORA: our LoRA, XLORA: X-LoRA)
            importer = get_peft_importer(read_adapter_config(path).get("peft_type"), str(path / "adapter_config.json"))
            try:
                model = importer(cls, base_model, path, base_model_id)
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                if isinstance(exc, MoeloraError):
                    raise
                # a field of the wrong type or missing (r: "x", no "r"): name the file, not a traceback line
                raise CheckpointError(f"PEFT adapter config {path / 'adapter_config.json'} has a missing or "
                                      f"wrongly typed field: {type(exc).__name__}: {short_repr(str(exc))}") from None
        else:
            pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            hint = f"; found only pickle files {pickles}, which moelora never loads" if pickles else ""
            if (path / "model.safetensors").is_file():  # transformers.Trainer.save_model() wrote only that
                hint += ("; a Trainer.save_model() folder holds the adapter without its config: save with "
                         "model.save_pretrained(dir), or load a checkpoint-N folder (those carry the moelora files)")
            raise CheckpointError(f"{path} holds no adapter: expected {CONFIG_NAME} (moelora) or "
                                  f"adapter_config.json (PEFT){hint}")
        model.train(is_trainable)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return model


def get_moelora_model(base_model: nn.Module, config, base_model_id: str | None = None,
                      encoders=None) -> MoELoRAModel:
    """Freeze `base_model`, inject the method's layers into its target modules and wrap it.

    `encoders` (a `moelora.multimodal.EncoderConfig`) adds trainable image/audio encoders whose outputs
    replace placeholder tokens (DESIGN §4.5); methods whose model is multimodal by nature have them anyway."""
    if isinstance(config, dict):
        config = config_from_dict(config)
    model_cls = get_method(config.method_name).model_cls or MoELoRAModel
    model = model_cls(base_model, config, base_model_id)
    if encoders is not None:
        model.attach_encoders(encoders)
    return model


def load(path: str | Path, dtype: torch.dtype = torch.float32, allow_non_finite: bool = False):
    """(model, tokenizer) for a released adapter folder: the base is resolved from its manifest.
    NaN/inf adapter weights are refused unless `allow_non_finite=True`."""
    from .base_models import resolve_base_model

    manifest = read_json(Path(path) / MANIFEST_NAME, "manifest")
    base_id = manifest.get("base_model")
    if not isinstance(base_id, str) or not base_id:
        raise CheckpointError(f"{path}/{MANIFEST_NAME} names no base_model (a string), got {short_repr(base_id)}")
    base, tokenizer = resolve_base_model(base_id, dtype=dtype)
    return MoELoRAModel.from_pretrained(base, path, base_model_id=base_id, allow_non_finite=allow_non_finite), tokenizer


MoELoRAModel.forward.__signature__ = FORWARD_SIGNATURE
