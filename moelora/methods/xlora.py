"""X-LoRA (Buehler & Buehler, arXiv 2402.07148): a classifier mixes frozen LoRA experts per token and layer.

Each forward runs the model twice (DESIGN §4.4, PEFT's `XLoraModel` semantics):

  1. scaling pass (no gradient): every expert weighted by `scaling_pass_value` (0 by default, i.e. the base
     model; None = 1/E), giving the last hidden state h [B, T, H];
  2. classifier: an MLP on h (depth, size, dropout as PEFT) gives logits for E experts (x L adapted
     modules with `layerwise_scalings`, else broadcast to every module), softmax(logits / temperature);
  3. real pass: module l adds  g * sum_e lambda[b, t, l, e] * s_e * B_e A_e x  (g = global_scaling_weight),
     optionally keeping only the top-k experts per token (un-renormalised, as PEFT) and a softmax over
     them (`enable_softmax_topk`).

Each expert drops out its own input at its own rate (`expert_dropout`; by default a PEFT folder's
`lora_dropout`), with an independent mask per expert, as PEFT's expert LoRAs do.
Module index l is the order of the adapted modules in the model (PEFT's `layer_number`), so PEFT X-LoRA
checkpoints load unchanged (`moelora.methods.xlora_peft`). Experts are frozen by default; with
`use_trainable_adapters` they train and, unlike PEFT, are saved with the classifier (every save holds the
whole expert bank, so a checkpoint never depends on the folders it was built from).
`generate` keeps one KV cache per pass: two single-token forwards per new token, same tokens as uncached
generation (`moelora.methods.xlora_generate`). Not mergeable: the gates depend on the input.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MoeloraError
from ..experts import ExpertBankLayer, ExpertBankModel, ExpertsConfig
from ..layer import RouterStats, in_backward
from ..ops import rank_activation
from ..peft_compat import read_lora
from ..registry import register_method
from ..routing import top_k_gates


@dataclasses.dataclass
class XLoRAConfig(ExpertsConfig):
    # Every PEFT XLoraConfig option, under PEFT's names and defaults (`experts` is PEFT's `adapters`).
    hidden_size: int | None = None  # classifier input; None: the base model's hidden size (PEFT makes you say it)
    xlora_depth: int = 1  # classifier depth: 1 = one linear layer (PEFT default)
    xlora_size: int = 2048  # classifier hidden width when depth > 1 (PEFT default)
    xlora_dropout_p: float = 0.2  # classifier dropout when depth > 1 (PEFT default)
    enable_softmax: bool = True  # softmax over experts (PEFT default); false: raw logits as scalings
    enable_softmax_topk: bool = False  # softmax over the kept top-k only (PEFT: use instead of enable_softmax)
    softmax_temperature: float = 1.0  # lower = sharper (PEFT default 1)
    layerwise_scalings: bool = False  # one scaling set per adapted module (else shared by all; PEFT default)
    top_k_lora: int | None = None  # keep the k largest scalings per token (None: dense, PEFT default)
    scaling_pass_value: float | None = 0.0  # expert weight in the scaling pass: 0 = base model; None = 1/E
    global_scaling_weight: float = 1.0  # multiplies every expert's output (PEFT default 1)
    use_trainable_adapters: bool = False  # experts frozen, only the classifier trains (the paper's setting)
    # Input dropout per expert, as PEFT (each expert LoRA keeps its own lora_dropout, an independent mask each).
    # None: a PEFT folder's own lora_dropout, `dropout` for fresh experts; saved resolved, so reloads match.
    expert_dropout: dict[str, float] | None = None

    def validate(self) -> None:
        super().validate()
        n = len(self.expert_specs())
        if self.xlora_depth < 1:
            raise self.error("xlora_depth", f"must be >= 1, got {self.xlora_depth}")
        if self.xlora_size < 1:
            raise self.error("xlora_size", f"must be >= 1, got {self.xlora_size}")
        if not 0.0 <= self.xlora_dropout_p < 1.0:
            raise self.error("xlora_dropout_p", f"must be in [0, 1), got {self.xlora_dropout_p}")
        if self.softmax_temperature <= 0:
            raise self.error("softmax_temperature", f"must be > 0, got {self.softmax_temperature}")
        if self.top_k_lora is not None and not 1 <= self.top_k_lora <= n:
            raise self.error("top_k_lora", f"must be between 1 and the {n} experts (or null for dense), got {self.top_k_lora}")
        if self.hidden_size is not None and self.hidden_size < 1:
            raise self.error("hidden_size", f"must be >= 1, got {self.hidden_size}")
        for name, p in (self.expert_dropout or {}).items():
            if name not in self.expert_names:
                raise self.error(f"expert_dropout.{name}", f"no expert of that name; experts: {self.expert_names}")
            if not 0.0 <= p < 1.0:
                raise self.error(f"expert_dropout.{name}", f"must be in [0, 1), got {p}")

    def expert_dropouts(self) -> list[float]:
        """Each expert's input dropout p_e: `expert_dropout[name]`, else its PEFT folder's lora_dropout, else
        `dropout` (fresh experts)."""
        key = (repr(self.experts), repr(self.expert_dropout), self.dropout)
        cached = self.__dict__.get("_dropouts")
        if cached is None or cached[0] != key:  # reading each PEFT config once per distinct value
            given = self.expert_dropout or {}
            values = [float(given[s.name]) if s.name in given else
                      read_lora(s.path).dropout if s.path else
                      float(self.dropout) for s in self.expert_specs()]
            cached = (key, values)
            self.__dict__["_dropouts"] = cached
        return cached[1]

    def pass_value(self) -> float:
        return 1.0 / len(self.expert_specs()) if self.scaling_pass_value is None else float(self.scaling_pass_value)


class XLoRAClassifier(nn.Module):
    """Last hidden state [B, T, H] -> scalings [B, T, L, E]; `layers` is laid out as PEFT's (same keys)."""

    def __init__(self, cfg: XLoRAConfig, hidden: int, n_layers: int, n_experts: int, dtype, device):
        super().__init__()
        self.cfg, self.n_layers, self.n_experts = cfg, n_layers, n_experts
        out = n_experts * n_layers if cfg.layerwise_scalings else n_experts
        mods, width = [], hidden
        for _ in range(cfg.xlora_depth - 1):
            mods += [nn.Linear(width, cfg.xlora_size), nn.ReLU()]
            if cfg.xlora_dropout_p > 0:
                mods.append(nn.Dropout(cfg.xlora_dropout_p))
            width = cfg.xlora_size
        mods.append(nn.Linear(width, out))
        self.layers = nn.Sequential(*mods).to(device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden.to(self.layers[0].weight.dtype)).float()  # gates in fp32 (the base may be 16-bit)
        b, t = hidden.shape[:2]
        if self.cfg.layerwise_scalings:
            logits = logits.reshape(b, t, self.n_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(b, t, self.n_layers, self.n_experts)
        if self.cfg.enable_softmax:
            return torch.softmax(logits / self.cfg.softmax_temperature, dim=-1)
        return logits


class XLoRALayer(ExpertBankLayer):
    def __init__(self, base_layer, config: XLoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        self.layer_index = self.site.index  # this module's column block in the classifier output (PEFT's layer_number)
        # Each expert drops out its own input (PEFT: one lora_dropout per expert LoRA), so this layer applies
        # the dropout itself instead of the shared one before `update`.
        self.expert_p = config.expert_dropouts()
        self.dropout = nn.Identity()
        self.router_stats = RouterStats(self, self.n_experts)
        self.register_buffer("stat_gate_sum", torch.zeros(self.n_experts, device=base_layer.weight.device),
                             persistent=False)

    def update(self, x, out):
        gates = self.context.model_gates
        if gates is None:
            raise MoeloraError("X-LoRA layers need the scalings of XLoRAModel's scaling pass: call the XLoRAModel "
                               "(forward/generate), not the wrapped base model")
        n, e = x.shape[0], self.n_experts
        if isinstance(gates, float):  # the scaling pass: every expert weighted by a constant
            if gates == 0.0:
                return out
            lam = x.new_full((n, e), gates)
        else:
            if gates.shape[0] * gates.shape[1] != n:
                raise MoeloraError(f"X-LoRA scalings are for {gates.shape[0]}x{gates.shape[1]} tokens but this layer got "
                                   f"{n}: call the XLoRAModel (forward/generate), not the wrapped base model")
            lam = gates[:, :, self.layer_index, :].reshape(n, e).to(x.dtype)
        idx, vals = self._select(lam)
        if not isinstance(gates, float):
            self._record(lam, idx, vals)
        weight = self.expert_scaling.to(x.dtype) * self.config.global_scaling_weight
        h = self._dropped_shrink(x)
        if idx is None:
            return rank_activation(x, self.lora_A, self.lora_B, None, None, vals * weight, 1.0, self.block, h=h,
                                   out=out)
        return rank_activation(x, self.lora_A, self.lora_B, idx, idx, vals * weight[idx], 1.0, self.block, h=h,
                               out=out)

    def _dropped_shrink(self, x):
        """H = [drop_1(x) A_1^T ... drop_E(x) A_E^T] with an independent mask per expert while training, or None
        (the op computes x A^T) when no expert drops anything."""
        if not (self.training and any(p > 0 for p in self.expert_p)):
            return None
        b = self.block
        return torch.cat([F.dropout(x, p, training=True) @ self.lora_A[e * b:(e + 1) * b].t() if p > 0 else
                          x @ self.lora_A[e * b:(e + 1) * b].t() for e, p in enumerate(self.expert_p)], dim=-1)

    def _select(self, lam):
        """(expert ids [N, k] or None for all, their scalings): PEFT's top-k and softmax-over-top-k."""
        cfg = self.config
        k = cfg.top_k_lora
        if k is None or k >= self.n_experts:
            return None, (torch.softmax(lam, dim=-1) if cfg.enable_softmax_topk else lam)
        # An explicit index mask (PEFT masks by "value != 0", which drops a kept scaling that is exactly 0).
        return top_k_gates(lam, k, "softmax" if cfg.enable_softmax_topk else "raw")

    @torch.no_grad()
    def _record(self, lam, idx, vals):
        if not self.track_stats or in_backward():
            return
        mask = self.context.flat_mask(lam.shape[0])
        selected = lam.argmax(-1, keepdim=True) if idx is None else idx
        self.router_stats.record(selected, vals.abs() if idx is not None else lam.abs(), mask)
        lam = lam.float()
        self.stat_gate_sum += (lam.sum(0) if mask is None else (lam * mask[:, None].to(lam.dtype)).sum(0))  # no lam[mask]: a GPU sync

    def stats(self):
        out = super().stats()
        tokens = out["tokens"]
        out["mean_scaling"] = [round(float(v) / tokens, 6) for v in self.stat_gate_sum] if tokens else []
        return out

    def reset_stats(self):
        super().reset_stats()
        self.stat_gate_sum.zero_()


_FORWARD_ONLY = ("labels", "logits_to_keep", "return_dict", "output_attentions", "output_hidden_states",
                 "supervised_positions", "num_items_in_batch")


class XLoRAModel(ExpertBankModel):
    """Adds the classifier and the scaling pass to the expert bank (see the module docstring)."""

    def __init__(self, base_model, method_config: XLoRAConfig, base_model_id=None):
        super().__init__(base_model, method_config, base_model_id)
        self.xlora_layers = sorted(self.adapter_layers().values(), key=lambda layer: layer.site.index)
        hidden = base_model.config.get_text_config().hidden_size
        if method_config.hidden_size not in (None, hidden):
            raise ConfigError("method.hidden_size", f"is {method_config.hidden_size} but the base model's hidden "
                              f"size is {hidden} (leave it null to use the model's)")
        w = self.xlora_layers[0].base_layer.weight
        self.xlora_classifier = self.place_adapter(XLoRAClassifier(method_config, hidden, len(self.xlora_layers),
                                                                   len(method_config.expert_specs()), w.dtype,
                                                                   w.device), like=w)
        self.scalings_logging = False
        self.scalings_log: list[torch.Tensor] = []
        self.latest_scalings: torch.Tensor | None = None

    def experts_trainable(self) -> bool:
        return self.method_config.use_trainable_adapters

    def saved_config(self) -> dict:
        meta = super().saved_config()
        # The saved bank no longer names the folders: keep the dropouts they gave.
        meta["config"]["expert_dropout"] = dict(zip(self.method_config.expert_names,
                                                    self.method_config.expert_dropouts()))
        return meta

    # --- the two passes -------------------------------------------------------------------------------
    def compute_scalings(self, past_key_values=None, **inputs) -> torch.Tensor:
        """Scaling pass (no gradient, experts at `scaling_pass_value`) + classifier: [B, T, L, E].

        `inputs` are the decoder's (input_ids or inputs_embeds, attention_mask, position_ids, ...);
        `past_key_values` is the scaling pass's own cache during cached generation."""
        self.context.model_gates = self.method_config.pass_value()
        decoder = self.base_model.base_model  # the transformer without the LM head: only h is needed
        with torch.no_grad():
            hidden = decoder(**inputs, past_key_values=past_key_values, use_cache=past_key_values is not None,
                             return_dict=True).last_hidden_state
        scalings = self.xlora_classifier(hidden)
        self.latest_scalings = scalings
        if self.scalings_logging:
            self.scalings_log.append(scalings.detach())
        return scalings

    def forward(self, *args, attention_mask=None, sample_labels=None, **kwargs):
        if args:
            kwargs["input_ids"] = args[0] if len(args) == 1 else None
            if len(args) > 1:
                raise TypeError("XLoRAModel.forward takes input_ids as its only positional argument")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise MoeloraError("XLoRAModel.forward runs both passes from scratch; for cached decoding use "
                               "generate(), which keeps one KV cache per pass")
        kwargs["use_cache"] = False
        self._check_token_ids(kwargs.get("input_ids"))  # before the scaling pass, which would fail opaquely
        self.context.model_gates = None
        if any(layer.adapter_enabled for layer in self.xlora_layers):  # inside disable_adapter(): the base only
            self.context.start_forward(attention_mask, sample_labels)
            inputs = {k: v for k, v in kwargs.items() if k not in _FORWARD_ONLY and k != "use_cache"}
            self.context.model_gates = self.compute_scalings(attention_mask=attention_mask, **inputs)
        return super().forward(attention_mask=attention_mask, sample_labels=sample_labels, **kwargs)

    def generate(self, *args, sample_labels=None, **kwargs):
        from .xlora_generate import generate

        args, kwargs, sample_labels = self.media_generation_inputs(args, kwargs, sample_labels)  # media -> embeds
        return generate(self, *args, sample_labels=sample_labels, **kwargs)

    # --- state: the classifier is saved with the expert bank -------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict()
        out.update({f"xlora_classifier.{k}": v for k, v in self.xlora_classifier.state_dict().items()})
        return out

    @contextlib.contextmanager
    def gathered_adapter(self):
        """As the base class, plus the classifier's parameters (ZeRO-3 shards them like the experts)."""
        with super().gathered_adapter():
            sharded = [p for p in self.xlora_classifier.parameters() if hasattr(p, "ds_id")]
            if not sharded:
                yield self
                return
            import deepspeed

            with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None):
                yield self

    # --- PEFT-style controls and scalings log (for evaluation and plots) -------------------------------
    def set_topk_lora(self, value: int | None) -> None:
        n = len(self.method_config.expert_specs())
        if value is not None and not 1 <= value <= n:
            raise ConfigError("method.top_k_lora", f"must be between 1 and {n} (or None), got {value}")
        self.method_config.top_k_lora = value

    def set_global_scaling_weight(self, weight: float) -> None:
        self.method_config.global_scaling_weight = float(weight)

    def get_global_scaling_weight(self) -> float:
        return self.method_config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        self.method_config.scaling_pass_value = None if value is None else float(value)

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The last classifier output [B, T, L, E] (during cached generation: the last step's, T = 1)."""
        return self.latest_scalings

    def enable_scalings_logging(self) -> None:
        self.scalings_logging = True

    def disable_scalings_logging(self) -> None:
        self.scalings_logging = False

    def get_scalings_log(self) -> list[torch.Tensor]:
        return list(self.scalings_log)

    def clear_scalings_log(self) -> None:
        self.scalings_log.clear()

    def scalings_summary(self) -> dict[str, list[float]]:
        """Per adapted module: the mean scaling of each expert over the real tokens since the last reset."""
        return {name: s["mean_scaling"] for name, s in self.router_stats().items()}


register_method("xlora", XLoRAConfig, XLoRALayer, model_cls=XLoRAModel)
