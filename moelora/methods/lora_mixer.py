"""LoRA-Mixer (Li et al., arXiv 2507.00029): routed LoRA experts inside the attention projections.

Every adapted projection (q, k, v, o by default) holds E LoRA experts and a token-level softmax router
reading the projection's own input (DESIGN §4.2):

    p = softmax(W_r x)                              [E] per token
    y = W0 x + sum_e g_e * s_e * B_e A_e x          g = p (training: soft mixture over all experts)
                                                    g = top-K of p, renormalised (inference; K = 3; also in
                                                        training with `train_top_k`: MoE-LoRA top-1/top-2)
                                                    g = one-hot(task label) (stage 1: hard routing by label)

Paradigms and stages (`stage:`):
  joint_stage1   routes each sample to the expert named after its task (labels from `task_labels`, which
                 train.py passes as `sample_labels`) and trains the experts; the router is unused.
  joint_stage2   trains the router soft on a (small, mixed) set; experts frozen when loaded (from
                 `init_from`, a stage-1 checkpoint, or PEFT folders), or trainable with the preservation term.
  plug_and_play  experts are existing PEFT LoRA folders (each its own rank and alpha), frozen; router only.

Router loss (SBL in v1 of the paper, RSL in v2), over the real (non-padding) tokens of a batch:

    L = alpha * E * sum_i pbar_i fbar_i  +  lambda * mean_x H(p(x))  [ + beta * sum ||theta - theta0||^2 ]

pbar_i the mean router probability, fbar_i the fraction of tokens whose top-1 is i (no gradient), H the
entropy. lambda > 0 minimises entropy (peaked, specialised routing), as the paper's text describes;
`entropy_sign_as_printed: true` flips it to the printed "- lambda H". The terms are logged per layer
(`router_stats()[...]["loss_terms"]`, averaged into train.py's log as aux/<term>).
Not mergeable: the gates depend on the input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..adapter_folder import CONFIG_NAME, is_moelora_folder, read_moelora_folder
from ..errors import CheckpointError, ConfigError, MoeloraError
from ..experts import ExpertBankLayer, ExpertBankModel, ExpertsConfig
from ..layer import LossTerms, RouterStats
from ..ops import rank_activation
from ..registry import register_method
from ..routing import balance_loss, mean_entropy, per_token, top_k_gates, token_weights

QKV = ("q_proj", "k_proj", "v_proj")  # read the same input: one router can serve all three
_TERMS = ("balance", "entropy", "preserve")


@dataclasses.dataclass
class LoRAMixerConfig(ExpertsConfig):
    stage: Literal["joint_stage1", "joint_stage2", "plug_and_play"] = "joint_stage2"  # soft router: the common case
    train_experts: bool | None = None  # None: experts train unless loaded (PEFT folders, init_from), as the paper
    top_k: int = 3  # experts per token at inference (renormalised); the paper's K; 0 = soft mixture at inference too
    renormalize_top_k: bool = True  # top-K gates sum to 1 (the paper leaves it open; our recommendation)
    train_top_k: bool = False  # true: top-K routing in training too (MoE-LoRA baselines); the paper trains soft
    shared_router: bool = False  # one router for q/k/v of a block (they read the same input); paper: unspecified
    balance_coef: float = 0.01  # alpha of the balance term in the Switch (E-scaled) convention, as Mixtral
    entropy_coef: float = 0.01  # lambda, signed: > 0 minimises per-token routing entropy (the paper's text)
    entropy_sign_as_printed: bool = False  # true: use "- lambda * H" exactly as the paper's equation prints it
    preserve_coef: float = 0.0  # beta of beta * ||theta - theta0||^2 on trainable experts; 0 when experts are frozen
    init_from: str | None = None  # a lora_mixer checkpoint folder to start from (stage 2 from stage 1)

    def validate(self) -> None:
        super().validate()
        if self.top_k < 0:
            raise self.error("top_k", f"must be >= 0 (0 = soft mixture at inference), got {self.top_k}")
        for name in ("balance_coef", "preserve_coef"):
            if getattr(self, name) < 0:
                raise self.error(name, f"must be >= 0, got {getattr(self, name)}")
        if self.stage == "joint_stage1" and self.train_experts is False:
            raise self.error("train_experts", "stage joint_stage1 trains the experts; it cannot be false")
        if self.stage == "plug_and_play" and self.train_experts:
            raise self.error("train_experts", "stage plug_and_play trains the router only (use joint_stage2 "
                             "with train_experts: true to tune loaded experts under the preservation term)")
        if self.stage == "plug_and_play" and self.init_from is None:
            fresh = [s.name for s in self.expert_specs() if s.path is None and s.source is None]
            if fresh:  # a router over frozen zero-initialised experts trains nothing: the loss stays flat
                raise self.error("experts", f"stage plug_and_play routes over existing experts, but {fresh} are "
                                 "fresh (zero updates, frozen); give PEFT folders ({name: path}) or init_from, "
                                 "or train them with stage joint_stage2")
        if self.preserve_coef > 0 and not self.experts_trainable():
            raise self.error("preserve_coef", "acts on trainable experts only; these experts are frozen "
                             "(set train_experts: true, or preserve_coef: 0)")
        if self.init_from is not None and not Path(self.init_from).is_dir():
            raise self.error("init_from", f"checkpoint folder not found: {self.init_from}")

    def experts_trainable(self) -> bool:
        if self.train_experts is not None:
            return self.train_experts
        if self.stage == "joint_stage1":
            return True
        if self.stage == "plug_and_play" or self.init_from is not None:
            return False
        return all(s.path is None for s in self.expert_specs())  # fresh experts train with the router

    def task_labels(self, tasks: list[str]) -> list[int] | None:
        """Stage 1 routes by task: each sample goes to the expert named after its task."""
        if self.stage != "joint_stage1":
            return None
        names = self.expert_names
        for t in tasks:
            if t not in names:
                raise self.error("experts", f"stage joint_stage1 routes each sample to the expert named after "
                                 f"its task, and task '{t}' has none; experts: {names}")
        return [names.index(t) for t in tasks]


class LoRAMixerLayer(ExpertBankLayer):
    def __init__(self, base_layer, config: LoRAMixerConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        # Small random router: routing starts near uniform (loaded experts start near their average), and
        # ties do not send every token's top-1 to expert 0 (which the load statistics would report as collapse).
        self.router = nn.Parameter(torch.empty(self.n_experts, self.in_features, dtype=self.adapter_dtype, device=w.device))
        nn.init.normal_(self.router, std=0.02)
        self.router_owner: tuple[LoRAMixerLayer, ...] = ()  # (q_proj's layer,) when this one shares its router
        self.router_stats = RouterStats(self, self.n_experts)
        self.loss_terms = LossTerms(self, _TERMS)  # each term's running mean, for the training log

    def router_weight(self) -> torch.Tensor:
        return self.router_owner[0].router if self.router_owner else self.router

    def update(self, x, out):
        cfg = self.config
        scaling = self.expert_scaling.to(x.dtype)
        labels = self._token_labels(x.shape[0]) if cfg.stage == "joint_stage1" else None
        if labels is not None:  # stage 1: exactly the labelled expert, gate 1 (times its own scaling)
            idx = labels[:, None]
            self.record_routing(idx, torch.ones_like(idx, dtype=x.dtype))
            self._add_losses(None)
            return rank_activation(x, self.lora_A, self.lora_B, idx, idx, scaling[idx], 1.0, self.block, out=out)
        n_rows = self.lora_A.shape[0]
        # One GEMM for router logits and the shrink H = x A^T (the router reads the same input).
        logits, h = (x @ torch.cat([self.router_weight(), self.lora_A]).t()).split([self.n_experts, n_rows], dim=-1)
        probs = torch.softmax(logits.float(), dim=-1)  # routing in fp32 whatever the compute dtype
        k = min(cfg.top_k, self.n_experts)
        soft_training = self.training and not cfg.train_top_k
        if soft_training or k in (0, self.n_experts):  # soft mixture (top-E renormalised is the same thing)
            self.record_routing(probs.argmax(-1, keepdim=True), probs)
            self._add_losses(logits)
            return rank_activation(x, self.lora_A, self.lora_B, None, None, probs * scaling, 1.0, self.block,
                                   h=h, out=out)
        idx, top = top_k_gates(probs, k, "renormalize" if cfg.renormalize_top_k else "raw")
        self.record_routing(idx, top)
        self._add_losses(logits)  # training with train_top_k (inference adds nothing)
        return rank_activation(x, self.lora_A, self.lora_B, idx, idx, top * scaling[idx], 1.0, self.block,
                               h=h, out=out)

    def _token_labels(self, n_tokens: int) -> torch.Tensor | None:
        labels = self.context.sample_labels
        if labels is None:
            if self.training:
                raise MoeloraError("LoRA-Mixer stage joint_stage1 routes by task label, but this batch carries no "
                                   "sample_labels (train.py passes them; or call model(..., sample_labels=ids))")
            return None  # inference without labels: the (soft/top-K) router decides
        return per_token(labels.to(self.lora_A.device), n_tokens, "sample_labels")

    # --- router loss (SBL/RSL) and preservation ---------------------------------------------------------
    def _add_losses(self, logits: torch.Tensor | None) -> None:
        if not (self.training and torch.is_grad_enabled()):
            return  # inference: no router loss
        cfg = self.config
        terms, loss = {}, None
        if logits is not None and not self.router_owner:  # a shared router's loss is counted once, by q_proj
            # Means over the real tokens (a batch of padding only gives zero terms); fbar is top-1 usage.
            w = token_weights(self.context.flat_mask(logits.shape[0]), logits.shape[0], logits)
            terms["balance"] = balance_loss(torch.softmax(logits.float(), dim=-1), w)
            terms["entropy"] = mean_entropy(logits, w)
            lam = -cfg.entropy_coef if cfg.entropy_sign_as_printed else cfg.entropy_coef
            loss = cfg.balance_coef * terms["balance"] + lam * terms["entropy"]
        if cfg.preserve_coef > 0 and self.lora_A.requires_grad:
            terms["preserve"] = ((self.lora_A - self.anchor_A).pow(2).sum() + (self.lora_B - self.anchor_B).pow(2).sum())
            pres = cfg.preserve_coef * terms["preserve"].float()
            loss = pres if loss is None else loss + pres
        if loss is not None:
            self.add_router_loss(loss, terms)


class LoRAMixerModel(ExpertBankModel):
    """Ties q/k/v routers when asked, starts from `init_from`, and keeps the preservation anchors."""

    def __init__(self, base_model, method_config, base_model_id=None):
        super().__init__(base_model, method_config, base_model_id)
        cfg = method_config
        layers = self.adapter_layers()
        if cfg.shared_router:
            owners: dict[str, LoRAMixerLayer] = {}
            for name, layer in layers.items():
                parent, _, leaf = name.rpartition(".")
                if leaf not in QKV:
                    continue
                if parent in owners:  # keep one router per block: q_proj's (the first of q/k/v targeted)
                    del layer.router
                    layer.router_owner = (owners[parent],)
                else:
                    owners[parent] = layer
        if cfg.init_from is not None:
            self._load_init_from(Path(cfg.init_from))
        for layer in layers.values():
            if not layer.router_owner:
                layer.router.requires_grad_(cfg.stage != "joint_stage1")  # stage 1 routes by label only
            if cfg.preserve_coef > 0 and cfg.experts_trainable():
                # theta0: the experts as loaded; saved with the adapter so a resumed run anchors to the same
                layer.register_buffer("anchor_A", layer.lora_A.detach().clone())
                layer.register_buffer("anchor_B", layer.lora_B.detach().clone())

    def experts_trainable(self) -> bool:
        return self.method_config.experts_trainable()

    def forward(self, *args, sample_labels=None, **kwargs):
        if sample_labels is not None:
            e = self.method_config.expert_specs()
            if sample_labels.numel() and (int(sample_labels.min()) < 0 or int(sample_labels.max()) >= len(e)):
                raise MoeloraError(f"sample_labels must be expert indices in [0, {len(e)}), got "
                                   f"{sample_labels.tolist()}")
        return super().forward(*args, sample_labels=sample_labels, **kwargs)

    def _load_init_from(self, folder: Path) -> None:
        if not is_moelora_folder(folder):
            raise ConfigError("method.init_from", f"{folder} holds no moelora adapter ({CONFIG_NAME})")
        saved = read_moelora_folder(folder, self.base_model, what="init_from adapter")  # checks the base too
        if saved.method != "lora_mixer":
            raise ConfigError("method.init_from", f"{folder} holds a '{saved.method}' adapter, not lora_mixer")
        theirs = {s.name: s.r for s in saved.config.expert_specs()}
        ours = {s.name: s.r for s in self.method_config.expert_specs()}
        if theirs != ours:
            raise CheckpointError(f"init_from {folder} does not fit this config: its experts (name: rank) are "
                                  f"{theirs}, method.experts gives {ours}")
        tensors, _ = self.read_adapter_files(folder)
        tensors = {k: v for k, v in tensors.items() if ".anchor_" not in k}
        own = self.adapter_state_dict()
        if set(own) != set(tensors):
            diff = sorted(set(own) ^ set(tensors))
            raise CheckpointError(f"init_from {folder} does not fit this config (different experts, target_modules "
                                  f"or shared_router?): keys differ, e.g. {diff[:3]}")
        self.load_adapter_state_dict(tensors, where=f"init_from {folder}")

    def saved_config(self) -> dict:
        meta = super().saved_config()
        # The checkpoint holds the weights init_from gave, and its trainability must not depend on re-reading files.
        meta["config"]["init_from"] = None
        if self.method_config.init_from is not None:  # where the experts came from (plug_and_play needs one)
            for spec in meta["config"]["experts"].values():
                spec.setdefault("source", str(self.method_config.init_from))
        meta["config"]["train_experts"] = self.method_config.experts_trainable()
        return meta


register_method("lora_mixer", LoRAMixerConfig, LoRAMixerLayer, model_cls=LoRAMixerModel)
