"""CoMoL (Cao, Fan et al., ACL 2026 Findings, arXiv 2603.00573): core experts merged in a shared LoRA's core space.

Each adapted linear keeps ONE LoRA (A [r, d_in], B [d_out, r]) and E small core experts C_e [r, r] that live
between them; a token-level router soft-merges the cores per token:

    h    = A drop(x)                          [r]     the core-space input
    g    = softmax(W_R h)                     [E]     core router (core_router: true; else softmax(W_R x))
    C(x) = sum_e g_e C_e                      [r, r]  (never built: see below)
    u    = h C(x)                             [r]     (row vector times matrix)
    y    = W0 x + s B u                       s = alpha / r (alpha = r in the reference: s = 1)

Through the op: h C(x) = sum_e g_e (h C_e), so with H_e = h C_e the update is sum_e g_e B H_e, i.e. the
routed-blocks form of `rank_activation` with E blocks of r ranks whose shrink factors are C_e^T A and which
all share the one B: A' = [C_1^T A; ...; C_E^T A], B' = [B, ..., B], dense gates g, and H = [H_1 ... H_E]
handed to the op (computed as x A^T, then the E small r x r products: N*r*(d_in + E*r) multiply-adds,
not N*E*r*d_in). The expand is E*r wide (at r=16, E=8 that of a rank-128 LoRA) and the per-token merged core
[N, r, r] is never materialised.

Dense routing, no auxiliary loss (the released code; the paper's "selects and activates" is not sparse there).
Init as the reference: A and every C_e kaiming-uniform (a=sqrt(5)), B zero (a fresh adapter is the identity),
router nn.Linear's default. Deviation: the reference also applies dropout to the merged core C(x) and to u;
here dropout acts on the input only (on C(x) it would need the per-token core this path never builds).
Not mergeable: the merged core depends on the input.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import MethodConfig
from ..layer import AdapterLayer, RouterStats, kaiming_uniform_
from ..ops import rank_activation
from ..registry import register_method


@dataclasses.dataclass
class CoMoLConfig(MethodConfig):
    # The reference's math/commonsense targets (q, k, v, o, up, down; its code runs use q, k, v, o, down).
    target_modules: list[str] | str = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    r: int = 16  # rank of the shared LoRA = size of each core: the reference's default
    num_experts: int = 8  # E core experts per module: the reference's default
    alpha: float | None = None  # None = r, the reference's lora_alpha = lora_rank (scaling 1)
    core_router: bool = True  # route from h = A x (r inputs: LoRA-sized); false: from x (d_in inputs)
    dropout: float = 0.1  # on the adapter input: the reference's lora_dropout

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise self.error("r", f"must be >= 1, got {self.r}")
        if self.num_experts < 1:
            raise self.error("num_experts", f"must be >= 1, got {self.num_experts}")
        if self.alpha is not None and self.alpha <= 0:
            raise self.error("alpha", f"must be > 0 (or null for alpha = r), got {self.alpha}")

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


class CoMoLLayer(AdapterLayer):
    def __init__(self, base_layer, config: CoMoLConfig, context, site=None):
        super().__init__(base_layer, config, context, site)
        w = base_layer.weight
        dtype = getattr(self, "adapter_dtype", w.dtype)
        kw = dict(dtype=dtype, device=w.device)
        r, e = config.r, config.num_experts
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        self.cores = nn.Parameter(torch.empty(e, r, r, **kw))  # C_e, indexed [e, p, q]: u_q = sum_p h_p C_e[p, q]
        self.router = nn.Parameter(torch.empty(e, r if config.core_router else self.in_features, **kw))
        kaiming_uniform_(self.lora_A)
        for core in self.cores.data:
            kaiming_uniform_(core)  # "initialisation is important" (reference): each core as an r x r linear
        kaiming_uniform_(self.router)
        self.scaling = config.scaling
        self.router_stats = RouterStats(self, e)

    def update(self, x, out):
        r, e = self.config.r, self.config.num_experts
        h = x @ self.lora_A.t()                                              # [N, r]
        logits = (h if self.config.core_router else x) @ self.router.t()
        g = torch.softmax(logits.float(), dim=-1)                            # [N, E], routing in fp32
        self.record_routing(g.argmax(-1, keepdim=True), g)
        blocks = torch.einsum("np,epq->neq", h, self.cores).reshape(-1, e * r)   # H_e = h C_e
        # The op's contract: blocks of A' = C_e^T A behind B' = [B ... B]; H (= x A'^T) is handed in, so A'
        # only names the shapes (no gradient is taken through it: H carries the graph to A and the cores).
        with torch.no_grad():
            a_blocks = torch.einsum("epq,pd->eqd", self.cores, self.lora_A).reshape(e * r, -1)
        return rank_activation(x, a_blocks, self.lora_B.repeat(1, e), None, None, g, self.scaling,
                               block=r, h=blocks, out=out)


register_method("comol", CoMoLConfig, CoMoLLayer)
