"""MeteoRA (Xu, Lai, Huang; ICLR 2025, arXiv 2405.13053): task LoRAs as experts behind a gate in every linear.

E task LoRAs (usually existing PEFT folders, one per task) sit in every adapted linear ("full mode": all
seven projections of a Llama block), and each adapted linear has its own gate on its own input:

    z   = W_g x                                   [E] gate logits per token (no bias)
    S   = top-k(z)                                k = 2 in the reference
    w_j = softmax_{j in S}(z_j / tau)             tau = temperature (the reference: 1 in training; 15-30 for
                                                   long composite prompts); k = 1 gives w = 1
    y   = W0 x + sum_{j in S} w_j * s_j * B_j A_j drop(x)      s_j = alpha_j / r_j of expert j

The gates are trained with the LM loss plus a *supervised* gate loss towards each sample's task:

    L = L_LM + lambda * mean over the samples s of [ mean over every gate and token t of s whose next token is
                                                      real of CE(z_t, task of s) ]

(lambda = `gate_loss_coef`, 50 in the reference; one mean over the concatenated gates equals the mean of
the per-module means, since every module sees the same tokens). The reference takes one mean over a device's
micro-batch tokens; ours is per sample, then over the samples (a sample without a task expert adds 0), so
that 2 processes x batch b, 1 process x batch 2b and gradient accumulation train alike: trainers average
micro-batch losses, and a mean of equal-sized per-sample means is the optimizer step's mean. The task ids arrive as `sample_labels`:
train.py passes `task_labels(tasks)` (the index of the expert named after each sample's task; samples of
tasks without an expert of that name get no gate loss). Without labels only the LM loss trains.
Inference routes per token at every decode step (the reference's "timely switching"); no label is read.

Trainable: the gates; the experts too when fresh, frozen when they are PEFT folders (the paper's setting;
`train_experts: true` tunes them, as the released training script does). The gate reads the layer input
before dropout; the experts read it after (reference). Not mergeable: the gates depend on the input.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import ALL_LINEAR
from ..errors import MoeloraError
from ..experts import ExpertBankLayer, ExpertBankModel, ExpertsConfig
from ..layer import LossTerms, RouterStats, kaiming_uniform_
from ..ops import rank_activation
from ..registry import register_method
from ..routing import per_token, supervised_gate_loss, token_weights, top_k_gates

IGNORE = -100  # a sample without a task expert: no gate loss (the reference's label for padding)


@dataclasses.dataclass
class MeteoRAConfig(ExpertsConfig):
    target_modules: list[str] | str = dataclasses.field(default_factory=lambda: list(ALL_LINEAR))  # "full mode"
    r: int = 8  # rank of fresh experts: the released MeteoRA adapters are r=8
    alpha: float = 16.0  # fresh experts' alpha: the released adapters' (scaling 2)
    top_k: int = 2  # experts per token: the reference's default (its top-1 variant: 1)
    temperature: float = 1.0  # tau of the softmax over the selected logits; the reference trains at 1
    gate_loss_coef: float = 50.0  # lambda of the supervised gate CE: the reference's hard-coded value
    train_experts: bool | None = None  # None: fresh experts train, PEFT folders stay frozen (gates only: the paper)

    def validate(self) -> None:
        super().validate()
        n = len(self.expert_specs())
        if not 1 <= self.top_k <= n:
            raise self.error("top_k", f"must be between 1 and the {n} experts, got {self.top_k}")
        if self.temperature <= 0:
            raise self.error("temperature", f"must be > 0, got {self.temperature}")
        if self.gate_loss_coef < 0:
            raise self.error("gate_loss_coef", f"must be >= 0, got {self.gate_loss_coef}")

    def experts_trainable(self) -> bool:
        if self.train_experts is not None:
            return self.train_experts
        return all(s.path is None for s in self.expert_specs())

    def task_labels(self, tasks: list[str]) -> list[int] | None:
        """The gate loss's target per sample: the index of the expert named after its task (-100: none)."""
        if self.gate_loss_coef == 0:
            return None
        names = self.expert_names
        return [names.index(t) if t in names else IGNORE for t in tasks]


class MeteoRALayer(ExpertBankLayer):
    def __init__(self, base_layer, config: MeteoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        # nn.Linear's default init, as the reference's gate after its last adapter is added.
        self.gate = nn.Parameter(torch.empty(self.n_experts, self.in_features, dtype=self.lora_A.dtype,
                                             device=self.lora_A.device))
        kaiming_uniform_(self.gate)
        # The gate reads the input before dropout and the experts after: this layer applies the dropout itself.
        self.expert_dropout, self.dropout = self.dropout, nn.Identity()
        self.n_gates = self.site.count  # gates in the model: the gate loss is a mean over all of them
        self.router_stats = RouterStats(self, self.n_experts)
        self.loss_terms = LossTerms(self, ("gate",))  # the unweighted gate CE, logged as aux/gate

    def update(self, x, out):
        cfg = self.config
        e, rows = self.n_experts, self.lora_A.shape[0]
        if self.training and cfg.dropout > 0:
            dropped = self.expert_dropout(x)
            logits, h = x @ self.gate.t(), dropped @ self.lora_A.t()
        else:  # one GEMM for the gate logits and the shrink H = x A^T (both read x)
            dropped = x
            logits, h = (x @ torch.cat([self.gate, self.lora_A]).t()).split([e, rows], dim=-1)
        idx, w = top_k_gates(logits, cfg.top_k, "softmax", temperature=cfg.temperature)
        self.record_routing(idx, w)
        self._add_gate_loss(logits)
        gates = w * self.expert_scaling[idx]
        return rank_activation(dropped, self.lora_A, self.lora_B, idx, idx, gates, 1.0, self.block, h=h, out=out)

    def _add_gate_loss(self, logits: torch.Tensor) -> None:
        labels = self.context.sample_labels
        if labels is None or self.config.gate_loss_coef == 0 or not (self.training and torch.is_grad_enabled()):
            return
        n = logits.shape[0]
        targets = per_token(labels.to(logits.device), n, "sample_labels")
        # The reference's shift, CE(z[:, :-1], y[:, 1:]): position t counts when token t+1 is real.
        real = token_weights(self.context.flat_mask(n), n, logits).view(labels.shape[0], -1)
        w = torch.cat([real[:, 1:], real.new_zeros(real.shape[0], 1)], dim=1).reshape(-1)
        # Per sample, then over the samples: the trainers average micro-batch losses over processes and
        # accumulation steps, and a mean of equal-sized per-sample means is the step's mean (a token mean is not).
        ce = supervised_gate_loss(logits, targets, w, n_samples=labels.shape[0])
        self.add_router_loss(self.config.gate_loss_coef * ce / self.n_gates, {"gate": ce})


class MeteoRAModel(ExpertBankModel):
    """Fills the experts from PEFT folders (the bank) and checks the task labels the gate loss reads."""

    def experts_trainable(self) -> bool:
        return self.method_config.experts_trainable()

    def forward(self, *args, sample_labels=None, **kwargs):
        if sample_labels is not None and sample_labels.numel():
            n = len(self.method_config.expert_specs())
            bad = (sample_labels >= n) | ((sample_labels < 0) & (sample_labels != IGNORE))
            if bool(bad.any()):  # one host read per forward, at the model level
                raise MoeloraError(f"sample_labels must be expert indices in [0, {n}) or {IGNORE} (no gate loss), "
                                   f"got {sample_labels.tolist()}")
        return super().forward(*args, sample_labels=sample_labels, **kwargs)

    def saved_config(self) -> dict:
        meta = super().saved_config()
        # The saved bank is the experts as trained: whether they train must not depend on where they came from.
        meta["config"]["train_experts"] = self.method_config.experts_trainable()
        return meta


register_method("meteora", MeteoRAConfig, MeteoRALayer, model_cls=MeteoRAModel)
