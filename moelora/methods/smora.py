"""SMoRA: Single-Ranked Mixture of Experts LoRA (Zhao et al., arXiv 2501.15103; KDD 2026).

Every one of the R ranks of a LoRA is an expert. Per token, a router scores all ranks, the top-k
are activated and the rest skipped (DESIGN §4.1, the released code's form):

    z = sigmoid(W_g x) + beta                 (gate_fn: sigmoid_norm; beta only in selection if
    S = top-k(z)                               bias_in_gate is false)
    g_j = z_j / sum_{S} z                     for j in S, 0 otherwise
    y = W0 x + (alpha / k) * B diag(k * g) A x

so each token's update is alpha times a convex combination of k rank-1 updates (per-rank weight 2
at R=64, k=8, alpha=16, the same as LoRA-64 with alpha=128).

`block_size` b (the reference's rank_partition) makes each expert a block of b consecutive ranks: the
router scores the R/b blocks, k counts the blocks selected (activated rank k*b), and

    y = W0 x + (alpha / (k b)) * sum_{j in S} k g_j * B_j A_j x      (B_j, A_j: block j's b ranks)

so b = 1 is SMoRA and b = r_e is a MoE-LoRA of R/r_e experts of rank r_e with top-k routing (8 x r8 top-1
is r=64, block_size=8, k=1: per-rank weight alpha/b, i.e. LoRA-8 with alpha 16 on the chosen expert). The
paper's claim is that finer blocks win at equal total and activated rank; configs/ablation/ runs its table.

Load balancing is loss-free: beta (a buffer, saved with the adapter) moves by u * sign(mean - count)
once per optimizer step, from selection counts summed over micro-batches, all-reduced across
processes, excluding padding, and never counted during gradient-checkpoint recomputation.
Performance: the router and A read the same x, so one GEMM against [W_g; A] gives both (DESIGN §1).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ..config import MethodConfig
from ..layer import AdapterLayer, RouterStats, count_selections, in_backward, kaiming_uniform_
from ..ops import rank_activation
from ..registry import register_method
from ..routing import top_k_gates


@dataclasses.dataclass
class SMoRAConfig(MethodConfig):
    r: int = 64  # total ranks R = number of rank experts (the paper's SMoRA-64/8)
    k: int = 8  # ranks activated per token: same activated rank as LoRA-8
    alpha: float = 16.0  # scaling alpha/k with gates summing to k: per-rank weight 2 (= LoRA-64, alpha 128)
    gate_fn: Literal["sigmoid_norm", "softmax_topk"] = "sigmoid_norm"  # released code: sigmoid, normalised over top-k
    bias_in_gate: bool = True  # released code uses the biased scores as gate values too (DeepSeek: selection only)
    bias_update_rate: float = 1e-5  # u in beta += u * sign(mean load - load); the reference's value
    block_size: int = 1  # ranks per expert: 1 = SMoRA (every rank an expert), r_e = MoE-LoRA of rank-r_e experts

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise self.error("r", f"must be >= 1, got {self.r}")
        if self.block_size < 1 or self.r % self.block_size:
            raise self.error("block_size", f"must divide r={self.r} (ranks per expert), got {self.block_size}")
        if self.block_size == 1 and not 1 <= self.k <= self.r:
            raise self.error("k", f"must be between 1 and r={self.r} (ranks activated out of r), got {self.k}")
        if not 1 <= self.k <= self.n_experts:
            raise self.error("k", f"must be between 1 and r/block_size={self.n_experts} (experts activated out of "
                             f"{self.n_experts}), got {self.k}")
        if self.bias_update_rate < 0:
            raise self.error("bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")

    @property
    def n_experts(self) -> int:
        """Experts the router scores: r / block_size blocks of ranks."""
        return self.r // self.block_size


class SMoRALayer(AdapterLayer):
    def __init__(self, base_layer, config: SMoRAConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        kw = dict(dtype=self.adapter_dtype, device=w.device)
        r, d_in = config.r, self.in_features
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        e = config.n_experts
        self.router = nn.Parameter(torch.empty(e, d_in, **kw))
        kaiming_uniform_(self.lora_A)
        kaiming_uniform_(self.router)  # nn.Linear's default init, as the reference router
        self.register_buffer("bias", torch.zeros(e, dtype=torch.float32, device=w.device))  # beta: saved
        self.register_buffer("pending_counts", torch.zeros(e, dtype=torch.float32, device=w.device), persistent=False)
        self.router_stats = RouterStats(self, e)
        self.scaling = config.alpha / (config.k * config.block_size)

    def route(self, logits: torch.Tensor):
        """(selected rank ids [N, k], normalised gates [N, k]) from router logits [N, R], in fp32."""
        cfg = self.config
        if cfg.gate_fn == "sigmoid_norm":
            return top_k_gates(torch.sigmoid(logits.float()), cfg.k, "renormalize", self.bias, cfg.bias_in_gate)
        return top_k_gates(logits.float(), cfg.k, "softmax", self.bias, cfg.bias_in_gate)

    def update(self, x, out):
        cfg = self.config
        # One GEMM for router logits and the shrink H = x A^T.
        logits, h = (x @ torch.cat([self.router, self.lora_A]).t()).split([cfg.n_experts, cfg.r], dim=-1)
        selected, gates = self.route(logits)
        self._count(selected, gates)
        return rank_activation(x, self.lora_A, self.lora_B, selected, selected, gates * cfg.k, self.scaling,
                               block=cfg.block_size, h=h, out=out)

    @torch.no_grad()
    def _count(self, selected, gates):
        if in_backward():  # checkpoint recomputation: this forward was already counted
            return
        mask = self.context.flat_mask(selected.shape[0])
        if self.training:  # padding counts 0
            count_selections(self.pending_counts, selected, mask)
        if self.track_stats:
            self.router_stats.record(selected, gates, mask)

    # --- once per optimizer step -------------------------------------------------------------
    def step_counts(self):
        return self.pending_counts

    @torch.no_grad()
    def apply_step(self, counts):
        # A step that routed no token carries no load signal: multiply by (sum > 0) rather than branch on
        # it, which would stop the host for the GPU in every layer.
        routed = (counts.sum() > 0).to(self.bias.dtype)
        self.bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts) * routed
        self.pending_counts.zero_()


register_method("smora", SMoRAConfig, SMoRALayer)
