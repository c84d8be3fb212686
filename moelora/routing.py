"""Routing arithmetic every method shares: pure functions, no parameters, no method names.

Notation: N tokens (a batch flattened), E experts (or rank blocks), k selected per token, w [N] the token
weights (1 for a real token, 0 for padding). All arithmetic runs in fp32 whatever the adapter's dtype
(DESIGN §2, "precision as PEFT"): every function here casts its scores with `.float()` first, so a bf16
router still selects and normalises exactly as an fp32 one would.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import MoeloraError

GateFn = Literal["renormalize", "softmax", "raw"]


def top_k_gates(scores: torch.Tensor, k: int, gate: GateFn = "renormalize", bias: torch.Tensor | None = None,
                bias_in_gate: bool = True, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k selection and its gates: (selected [N, k] expert ids, gates [N, k]).

        z  = scores + bias                     (bias [E]: selection only unless bias_in_gate)
        S  = top-k(z)                          ids sorted by z, best first
        v_j = z_j if bias_in_gate else scores_j,   j in S
        gate = "renormalize":  g_j = v_j / sum_{S} v          (scores already probabilities or sigmoids)
               "softmax":      g_j = exp(v_j / T) / sum_{S} exp(v / T)   (scores are logits; T = temperature)
               "raw":          g_j = v_j                        (no normalisation, e.g. X-LoRA's un-renormalised top-k)
    """
    scores = scores.float()
    biased = scores if bias is None else scores + bias.float()
    top, selected = biased.topk(k, dim=-1)
    values = top if bias is None or bias_in_gate else scores.gather(-1, selected)
    if gate == "renormalize":
        return selected, values / values.sum(-1, keepdim=True)
    if gate == "softmax":
        return selected, torch.softmax(values / temperature if temperature != 1.0 else values, dim=-1)
    if gate == "raw":
        return selected, values
    raise ValueError(f"top_k_gates: gate must be renormalize, softmax or raw, got {gate!r}")


def token_weights(mask: torch.Tensor | None, n_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """w [N] in fp32: the real-token mask as weights (1 real, 0 padding), or all ones without a mask.

    Weights instead of boolean indexing (p[mask]): indexing by a mask makes the host wait for a GPU."""
    if mask is None:
        return torch.ones(n_tokens, dtype=torch.float32, device=like.device)
    return mask.to(device=like.device, dtype=torch.float32)


def masked_mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_n w_n values_n / max(sum_n w_n, 1) over the first dim: the mean over real tokens (0 if none)."""
    w = w.to(values.dtype)
    return (values * w.view(-1, *([1] * (values.dim() - 1)))).sum(0) / w.sum().clamp_min(1.0)


def balance_loss(probs: torch.Tensor, w: torch.Tensor, selected: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load balance over the real tokens (E-scaled, as Mixtral):

        L_bal = E * sum_i  pbar_i * fbar_i,    pbar_i = mean_n p_i(x_n),   fbar_i = mean_n 1[i in S_n] / k

    probs [N, E]; S_n = selected[n] ([N, k]), or the top-1 expert of p when selected is None (Switch's
    definition). fbar carries no gradient; the loss is E * sum_i (1/E)(1/E) = 1 at a perfectly uniform router.
    """
    probs = probs.float()
    n_experts = probs.shape[-1]
    if selected is None:
        selected = probs.argmax(-1, keepdim=True)
    experts = torch.arange(n_experts, device=probs.device)
    hits = (selected.unsqueeze(-1) == experts).to(probs.dtype).sum(1) / selected.shape[-1]  # [N, E]
    fbar = masked_mean(hits, w).detach()
    return n_experts * (masked_mean(probs, w) * fbar).sum()


def mean_entropy(logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean_n H(p(x_n)) over the real tokens, H(p) = -sum_i p_i log p_i in nats, p = softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), w)


def sample_mean(values: torch.Tensor, w: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The mean over the B samples of each sample's mean over its weighted tokens (values, w [N = B * T]):

        (1 / B) * sum_b  sum_t w_bt v_bt / max(sum_t w_bt, 1)        (a sample without tokens counts 0)

    Unlike one mean over the batch's tokens, it is the same number whether an optimizer step's samples come in
    one micro-batch or in equal-sized micro-batches on several processes (data parallel, gradient accumulation),
    because the trainers average micro-batch losses: a mean of equal-sized means is the mean."""
    w = w.to(torch.float32).view(n_samples, -1)
    per_sample = (values.float().view(n_samples, -1) * w).sum(1) / w.sum(1).clamp_min(1.0)
    return per_sample.mean()


def supervised_gate_loss(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                         n_samples: int | None = None) -> torch.Tensor:
    """Cross-entropy of the gate against a target expert per token, over the real tokens:

        L_gate = mean_n  -log softmax(z_n)[y_n]        (y_n = the sample's task id, repeated for its tokens)

    logits [N, E], labels [N] int (-100 = ignore: the token counts as padding). With `n_samples` the mean is
    per sample first, then over the samples (`sample_mean`), so it does not depend on how a step is split."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels >= 0
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if n_samples is not None:
        return sample_mean(nll, w * keep.to(w.dtype), n_samples)
    return masked_mean(nll, w * keep.to(w.dtype))


def per_token(per_sample: torch.Tensor, n_tokens: int, what: str = "per-sample values") -> torch.Tensor:
    """Expand values of each of the B sequences ([B, ...]) to the N = B * T tokens ([N, ...]): token n of the
    flattened batch belongs to sequence n // T, so each row repeats T times."""
    n_seq = per_sample.shape[0]
    if n_seq == 0 or n_tokens % n_seq:
        raise MoeloraError(f"{what}: {n_seq} sequences do not divide the {n_tokens} tokens of this batch "
                         "(one value per sequence)")
    return per_sample.repeat_interleave(n_tokens // n_seq, dim=0)
