"""MixLoRA, conditional factor selection (Shen et al., "Multimodal Instruction Tuning with Conditional
Mixture of LoRA", ACL 2024, arXiv 2402.15896; code VT-NLP/MixLoRA). Not the TUDB-Labs "MixLoRA"
(Li et al. 2024, FFN LoRA experts with a top-2 token router), which is another method.

A LoRA is a sum of rank-1 factors, ΔW = Σ_m b_m a_mᵀ. Each adapted linear keeps pools of E factors for
A and for B and, per input *sequence*, assembles a rank-r ΔW from them (DESIGN §4.3):

    x̄      = mean of the layer input (before dropout) over the sequence's prompt tokens (the positions
             whose label is -100; all real tokens when there are no labels, as in generate)
    I_A    = top-r(softmax(W_A x̄))                     sorted by score: slot m holds the m-th best
    p_B    = softmax(W_B x̄)                            IFS (cond: ifs)
           + w · softmax(Σ_m softmax(a_{I_A[m]} · W_AB[m]))   CFS (cond: cfs): conditioned on the chosen
                                                        A factors (cfs_fusion: code; paper: no outer softmax)
    I_B    = top-r(p_B)
    y      = W0 x + (α/r) Σ_m g_m · b_{I_B[m]} (a_{I_A[m]} · x)      α = 2E by default (the reference)

The m-th best A factor is paired with the m-th best B factor (rank order), as in the reference.

Routers learn here (the reference's never get a gradient: selection uses only top-k indices). With
`router_train: ste` the pair gate is g_m = 1 + (s_A,m − sg(s_A,m)) + (s_B,m − sg(s_B,m)), with s the
selected scores and sg stop-gradient: the forward value is exactly 1 (the reference's output), and the
gradient of each selected score is that of the pair's gate, so W_A, W_B and W_AB all train.
`router_train: none` reproduces the reference (routers frozen at their random init).

Training and generation route from the same tokens: a training sequence is routed from its prompt (the
-100 labels reach the layers as `RoutingContext.prompt_mask`), a `generate` call once from its prompt, and
that choice is kept for every decode step, so cached and uncached decoding agree (the reference re-routes on the
current token at every step; spec §3.8 item 3). The update always runs through `rank_activation` with
separate A and B block indices: no per-instance ΔW is ever built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from ..config import MethodConfig
from ..errors import MoeloraError
from ..layer import AdapterLayer, RouterStats, in_backward, kaiming_uniform_
from ..ops import rank_activation
from ..registry import register_method
from ..routing import per_token


@dataclasses.dataclass
class MixLoRAConfig(MethodConfig):
    num_factors: int = 16  # E, factors per pool (A and B): the paper's E=16, r=4 beats LoRA-4 by 7% MME
    r: int = 4  # factors selected per sequence (rank of each instance's ΔW): the paper's best r
    alpha: float | None = None  # None = 2E, the reference's alpha (scaling 2E/r = 8 at E=16, r=4)
    cond: Literal["ifs", "cfs"] = "cfs"  # cfs: B's choice also depends on the chosen A factors (paper's best)
    cfs_fusion: Literal["code", "paper"] = "code"  # code: softmax over the summed CFS term (released code); paper: plain sum
    ifs_weight: float = 1.0  # w, weight of the CFS term in B's scores (the reference's ifs_weight)
    router_train: Literal["ste", "none"] = "ste"  # ste: routers learn (straight-through gates); none: frozen as the reference
    pool_padding: bool = False  # true: mean over padding too, as the reference (routing then depends on the batch)

    def validate(self) -> None:
        super().validate()
        if self.num_factors < 1:
            raise self.error("num_factors", f"must be >= 1, got {self.num_factors}")
        if not 1 <= self.r <= self.num_factors:
            raise self.error("r", f"must be between 1 and num_factors={self.num_factors} (factors selected out "
                             f"of the pool), got {self.r}")
        if self.alpha is not None and self.alpha <= 0:
            raise self.error("alpha", f"must be > 0 (or null for 2 * num_factors), got {self.alpha}")
        if self.ifs_weight < 0:
            raise self.error("ifs_weight", f"must be >= 0, got {self.ifs_weight}")

    @property
    def scaling(self) -> float:
        alpha = 2.0 * self.num_factors if self.alpha is None else self.alpha
        return alpha / self.r


class MixLoRALayer(AdapterLayer):
    def __init__(self, base_layer, config: MixLoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        kw = dict(dtype=self.adapter_dtype, device=w.device)
        e, r, d_in = config.num_factors, config.r, self.in_features
        # Pools stored as one [E, d] parameter each (not E parameters): the op indexes rows directly and
        # unselected rows get exact zero gradients (spec §3.9).
        self.lora_A = nn.Parameter(torch.empty(e, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, e, **kw))
        self.router_A = nn.Parameter(torch.empty(e, d_in, **kw))
        self.router_B = nn.Parameter(torch.empty(e, d_in, **kw))
        for p in (self.lora_A, self.router_A, self.router_B):
            kaiming_uniform_(p)  # A: LoRA's init; routers: nn.Linear's default, as the reference
        if config.cond == "cfs":
            # W_AB: one [d_in, E] map per slot; nn.Linear(r*d_in -> E)'s default init in the reference.
            self.router_AB = nn.Parameter(torch.empty(r, d_in, e, **kw))
            bound = 1.0 / math.sqrt(r * d_in)
            nn.init.uniform_(self.router_AB, -bound, bound)
        if config.router_train == "none":  # the reference: routers never receive a gradient
            for p in self.router_parameters():
                p.requires_grad_(False)
        self.scaling = config.scaling
        self.router_stats = RouterStats(self, e)  # load over the A pool, one count per sequence
        self._kept = None  # (context.forward_id, idx_a [B, r], idx_b [B, r]) chosen on a generate() prompt
        self._lead_shape = None
        self._route_x = None  # this forward's layer input before dropout: what the router pools

    def router_parameters(self) -> list[nn.Parameter]:
        return [self.router_A, self.router_B] + ([self.router_AB] if self.config.cond == "cfs" else [])

    def forward(self, x, *args, **kwargs):
        # [batch, seq]: where each sequence starts in the flattened input; and the input before the adapter's
        # dropout, which the router pools (the reference pools before dropout: routing is not random in training).
        self._lead_shape, self._route_x = x.shape[:-1], x
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self._route_x = None

    # --- routing: one choice per sequence ------------------------------------------------------
    def pooled_input(self, x: torch.Tensor, n_seq: int) -> torch.Tensor:
        """[n_seq, d_in]: each sequence's mean input over its prompt tokens (`RoutingContext.prompt_mask`: the
        positions whose label is -100), so training routes from exactly what generation routes from (the
        prompt); over all its real tokens when the batch has no labels (generate) or the sequence has no
        prompt position (labels = input_ids); over every position with `pool_padding` (the reference)."""
        xs = x.view(n_seq, -1, x.shape[-1]).float()  # pooled in fp32 (a no-op for fp32 inputs)
        dtype = self.router_A.dtype
        if self.config.pool_padding:
            return xs.mean(1).to(dtype)
        mask = self.context.flat_mask(x.shape[0])
        prompt = self.context.flat_prompt_mask(x.shape[0])
        if mask is None and prompt is None:
            return xs.mean(1).to(dtype)
        m = torch.ones(n_seq, xs.shape[1], 1, dtype=xs.dtype, device=x.device) if mask is None else \
            mask.view(n_seq, -1, 1).to(xs.dtype)
        if prompt is not None:  # per sequence, without a host read: the prompt if it has one, else m
            p = prompt.view(n_seq, -1, 1).to(xs.dtype)
            m = torch.where(p.sum(1, keepdim=True) > 0, p, m)
        return ((xs * m).sum(1) / m.sum(1).clamp_min(1.0)).to(dtype)

    def route(self, pooled: torch.Tensor):
        """(idx_a [B, r], idx_b [B, r], selected A scores [B, r], selected B scores [B, r]); slots sorted by score."""
        cfg = self.config
        # Routing arithmetic in fp32 whatever the compute dtype (16-bit scores tie at the r-th place).
        scores_a = torch.softmax((pooled @ self.router_A.t()).float(), dim=-1)
        top_a, idx_a = scores_a.topk(cfg.r, dim=-1, sorted=True)
        scores_b = torch.softmax((pooled @ self.router_B.t()).float(), dim=-1)
        if cfg.cond == "cfs":
            chosen_a = self.lora_A[idx_a]  # [B, r, d_in]: per sequence, not per token
            q = torch.softmax(torch.einsum("bmd,mde->bme", chosen_a.to(pooled.dtype), self.router_AB).float(),
                              dim=-1).sum(1)
            scores_b = scores_b + cfg.ifs_weight * (torch.softmax(q, dim=-1) if cfg.cfs_fusion == "code" else q)
        top_b, idx_b = scores_b.topk(cfg.r, dim=-1, sorted=True)
        return idx_a, idx_b, top_a, top_b

    def update(self, x, out):
        n = x.shape[0]
        lead = self._lead_shape
        n_seq = int(lead[0]) if lead is not None and len(lead) >= 2 else 1
        if n % n_seq:
            raise MoeloraError(f"MixLoRA layer {getattr(self, 'layer_name', '')}: {n} tokens do not split into "
                               f"{n_seq} sequences")
        ctx = self.context
        kept = self._kept
        if ctx.generating and kept is not None and kept[0] == ctx.forward_id and not in_backward():
            # A decode step of the generate() call whose prompt chose this routing: keep it.
            _, idx_a, idx_b = kept
            if idx_a.shape[0] != n_seq:
                raise MoeloraError(f"MixLoRA: generate() step has {n_seq} sequences but the prompt had "
                                   f"{idx_a.shape[0]}")
            gates = x.new_ones(n_seq, self.config.r)
        else:
            raw = self._route_x
            source = raw.reshape(n, -1) if raw is not None and raw.numel() == x.numel() else x
            idx_a, idx_b, top_a, top_b = self.route(self.pooled_input(source, n_seq))
            if self.config.router_train == "ste":  # value exactly 1, gradient into both routers
                gates = 1.0 + (top_a - top_a.detach()) + (top_b - top_b.detach())
            else:
                gates = x.new_ones(n_seq, self.config.r)
            if not in_backward():
                self._kept = (ctx.forward_id, idx_a.detach(), idx_b.detach()) if ctx.generating else None
                if self.track_stats:
                    self.router_stats.record(idx_a, top_a.detach(), None)
        # Every token of a sequence uses its sequence's factors.
        return rank_activation(x, self.lora_A, self.lora_B, per_token(idx_a, n), per_token(idx_b, n),
                               per_token(gates, n), self.scaling, out=out)


register_method("mixlora", MixLoRAConfig, MixLoRALayer)
