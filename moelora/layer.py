"""`AdapterLayer`: the wrapper every method puts around a base linear projection.

It runs the frozen base layer, then hands the flattened input and the base output to the method's
`update`, which adds the routed low-rank term through `moelora.ops.rank_activation`. Both
`nn.Linear` and GPT-2's `Conv1D` (weight stored transposed) are supported; the base layer is kept
as `base_layer` so the model's own weights keep their names and load as before.

Layers of one model share a `RoutingContext`: the model wrapper writes the padding mask of the
current batch there, so routers can exclude padding from load counts and sequence means.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers always has it today; keep the layer importable without it
    Conv1D = ()


IGNORE_INDEX = -100  # the label cross-entropy ignores: a prompt (or padding) position


class RoutingContext:
    """Per-forward facts every adapted layer may need, set by `MoELoRAModel.forward`."""

    def __init__(self):
        self.token_mask: torch.Tensor | None = None  # [batch, seq] bool: True for real (non-pad) tokens
        self.sample_labels: torch.Tensor | None = None  # [batch] int: e.g. task ids for routing by label
        # [batch, seq] bool: True for the real tokens of the prompt, i.e. those the LM loss does not score
        # (labels == -100). Set from the `labels` of a training/eval forward; None in generate(), whose
        # input is the prompt itself. Per-sequence routers (MixLoRA) pool over it, so training routes from
        # what generation will see.
        self.prompt_mask: torch.Tensor | None = None
        self.aux_losses: list[torch.Tensor] = []  # router losses added by layers during this forward
        # Per-sequence routers (MixLoRA) route a generate() call once, on the prompt, and reuse that choice
        # for every decode step: `generating` says the forwards since `start_forward` are one generate call,
        # `forward_id` tells a layer whether the choice it kept belongs to this call.
        self.generating = False
        self.forward_id = 0
        # Gates a model-level router computed before this forward, read by every layer (X-LoRA: the
        # classifier's per-token, per-layer scalings [batch, seq, layers, experts]); None otherwise.
        self.model_gates = None

    def start_forward(self, attention_mask=None, sample_labels=None, generating: bool = False,
                      labels: torch.Tensor | None = None) -> None:
        self.token_mask = attention_mask.bool() if attention_mask is not None else None
        self.sample_labels = sample_labels
        self.prompt_mask = None
        if torch.is_tensor(labels) and labels.dim() == 2:  # elementwise: no host read
            prompt = labels == IGNORE_INDEX
            if self.token_mask is not None and self.token_mask.shape == labels.shape:
                prompt = prompt & self.token_mask.to(prompt.device)
            self.prompt_mask = prompt
        self.aux_losses = []
        self.generating = generating
        if generating:  # only generate() calls need telling apart; an int that changed every forward would make
            self.forward_id += 1  # torch.compile re-trace each step (ints on modules are guarded as constants)

    def flat_mask(self, n_tokens: int) -> torch.Tensor | None:
        """The mask flattened to the layer's N tokens, or None when it does not describe this input
        (no mask given, or a cached generation step whose input is shorter than the mask)."""
        mask = self.token_mask
        if mask is None or mask.numel() != n_tokens:
            return None
        return mask.reshape(-1)

    def flat_prompt_mask(self, n_tokens: int) -> torch.Tensor | None:
        """`prompt_mask` flattened to the layer's N tokens, or None when there is none for this input."""
        mask = self.prompt_mask
        if mask is None or mask.numel() != n_tokens:
            return None
        return mask.reshape(-1)


def in_backward() -> bool:
    """True while autograd runs a backward pass, i.e. during gradient-checkpoint recomputation.

    Router bookkeeping (load counts, statistics) must count each forward once; a checkpointed
    layer is re-run inside backward and would otherwise be counted twice.

    Under torch.compile this Python runs once, while tracing the forward (the compiled backward replays
    recorded ops, never this code), so it is False there; asking autograd would break the graph.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported base projection."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if Conv1D and isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and transformers Conv1D are supported")


def kaiming_uniform_(weight: torch.Tensor) -> None:
    """LoRA's A init (as PEFT and the reference code): kaiming-uniform with a=sqrt(5), U(±1/sqrt(d_in))."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def adapter_dtype_for(config, base_dtype: torch.dtype) -> torch.dtype:
    """PEFT's rule: fp32 adapters under a 16-bit base unless `config.autocast_adapter_dtype` is false."""
    if getattr(config, "autocast_adapter_dtype", True) and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


@dataclasses.dataclass(frozen=True)
class LayerSite:
    """Where an adapted module sits in its model, given to its layer when it is built."""

    name: str  # the module's path in the base model, e.g. "model.layers.3.self_attn.q_proj"
    index: int  # its position among the model's adapted modules, in module order (PEFT X-LoRA's layer_number)
    count: int  # how many modules the model adapts
    block: int  # the transformer block holding it: the first number in its path (0 when there is none)
    n_blocks: int  # the base model's transformer blocks (num_hidden_layers; else 1 + the largest block seen)

    @classmethod
    def alone(cls, name: str = "") -> LayerSite:
        """The site of a layer built on its own (outside a model): the only module, block 0 of 1."""
        return cls(name, 0, 1, 0, 1)


def layer_sites(base_model: nn.Module, names: list[str]) -> list[LayerSite]:
    """The sites of the modules `names` (in model order) of `base_model`."""
    blocks = [next((int(part) for part in name.split(".") if part.isdigit()), 0) for name in names]
    config = getattr(base_model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_blocks = getattr(text, "num_hidden_layers", None) or (max(blocks, default=0) + 1)
    return [LayerSite(name, i, len(names), block, max(n_blocks, block + 1))
            for i, (name, block) in enumerate(zip(names, blocks))]


class AdapterLayer(nn.Module):
    """Base linear + routed low-rank update. Subclasses define `update` and their parameters."""

    method: str = ""
    mergeable = False  # only methods whose update is input-independent may fold into W0

    def __init__(self, base_layer: nn.Module, config, context: RoutingContext, site: LayerSite | None = None):
        super().__init__()
        self.base_layer = base_layer
        # Where it sits (name, index, block; the model passes it): a method may size its bank or router by it.
        # None: a layer built on its own, e.g. in a unit test.
        self.site = site = site or LayerSite.alone()
        self.layer_name = site.name
        self.in_features, self.out_features = linear_dims(base_layer)
        self.config = config
        self.context = context
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        self.track_stats = True
        # The dtype adapter tensors are created in and the update is computed in (fp32 under a 16-bit base by
        # default); `MoELoRAModel.place_adapter` enforces it for tensors a method created otherwise.
        self.adapter_dtype = adapter_dtype_for(config, base_layer.weight.dtype)

    # --- the forward every method shares -------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.adapter_enabled:
            return out
        flat_x = x.reshape(-1, self.in_features)
        flat_out = out.reshape(-1, self.out_features)
        dtype = self.adapter_dtype
        new = self.update(self.dropout(flat_x).to(dtype), flat_out.to(dtype))
        return new.to(out.dtype).view(out.shape)

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Return `out` [N, d_out] plus the method's update for inputs `x` [N, d_in]."""
        raise NotImplementedError

    # --- hooks the model calls -----------------------------------------------------------------
    def step_counts(self) -> torch.Tensor | None:
        """Counts accumulated since the last optimizer step that need an all-reduce, or None."""
        return None

    def apply_step(self, counts: torch.Tensor) -> None:
        """Called once per optimizer step with the all-reduced `step_counts()`."""

    # Layers with a router keep a `RouterStats` as `self.router_stats`, and layers with a router loss a `LossTerms`
    # as `self.loss_terms`; these defaults report and reset both, so a method only overrides them to add
    # statistics of its own (and calls these for the rest).
    def stats(self) -> dict | None:
        """Router utilisation since the last reset (and the mean of each router-loss term), or None for methods
        without a router."""
        router = getattr(self, "router_stats", None)
        out = router.summary() if router is not None else None
        terms = getattr(self, "loss_terms", None)
        if out is not None and terms is not None and (means := terms.summary()):
            out["loss_terms"] = means  # the unweighted terms, logged as aux/<term>
        return out

    def reset_stats(self) -> None:
        for part in (getattr(self, "router_stats", None), getattr(self, "loss_terms", None)):
            if part is not None:
                part.reset()

    def add_router_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Add this forward's router loss (already weighted) to the model's aux losses and its unweighted `terms`
        to `self.loss_terms`. Gradient-checkpoint recomputation runs the same ops (so saved tensors line up) but
        the forward already added the loss and counted its terms: nothing is added then."""
        if in_backward():
            return
        self.context.aux_losses.append(loss)
        self.loss_terms.record(terms)

    def record_routing(self, selected: torch.Tensor, gates: torch.Tensor) -> None:
        """Add this forward's choice (selected [N, k] ids, gates [N, k]) to the router statistics, counting real
        tokens only (`RouterStats.record` skips gradient-checkpoint recomputation)."""
        if self.track_stats:
            self.router_stats.record(selected, gates, self.context.flat_mask(selected.shape[0]))

    def delta_weight(self) -> torch.Tensor:
        """The constant ΔW [d_out, d_in] for mergeable methods."""
        raise NotImplementedError

    def merge(self) -> nn.Module:
        """Fold the update into the base weight and return the plain base layer."""
        if not self.mergeable:
            from .errors import MoeloraError

            raise MoeloraError(
                f"method '{self.method}' cannot be merged into the base weights: its routing depends on "
                "the input, so there is no single ΔW to add (keep the adapter unmerged)"
            )
        with torch.no_grad():
            delta = self.delta_weight().to(self.base_layer.weight.dtype)
            if isinstance(self.base_layer, nn.Linear):
                self.base_layer.weight += delta
            else:  # Conv1D stores W transposed: [d_in, d_out]
                self.base_layer.weight += delta.t()
        return self.base_layer


@torch.no_grad()
def count_selections(counts: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Add one to `counts[e]` for every slot of a real token (mask [N], None: all real) that selected expert e
    (selected [N, k]); returns the per-token weights [N] (1 real, 0 padding) in counts' dtype.

    scatter_add with weights, not bincount of selected[mask]: both of those make the host wait for a GPU
    (their output size depends on the data), and this runs in every adapted layer of every forward."""
    # As few ops as possible: this is the hot path whose op count benchmarks/host_ops.py tracks.
    if mask is None:
        ones = torch.ones(selected.shape, dtype=counts.dtype, device=counts.device)
        counts.scatter_add_(0, selected.flatten(), ones.flatten())
        return ones[:, 0]
    weight = mask.to(counts.dtype)
    counts.scatter_add_(0, selected.flatten(), weight[:, None].expand(selected.shape).flatten())
    return weight


def own_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, submodule) of `module` and its parts, without a wrapped `base_layer` (frozen base weights)."""
    return [(n, m) for n, m in module.named_modules() if n != "base_layer" and not n.startswith("base_layer.")]


def router_buffers_to_fp32(module: nn.Module, device: torch.device | None = None) -> None:
    """Floating buffers of `module`'s own parts (router state such as SMoRA's beta and counts) to fp32, on `device`
    if given (other buffers only move): they accumulate steps far below 16-bit resolution, whatever the adapter
    dtype or a whole-model cast (DeepSpeed's 16-bit engine casts every buffer)."""
    for _, sub in own_modules(module):
        for key, b in sub.named_buffers(recurse=False):
            if b.is_floating_point() and (b.dtype != torch.float32 or device is not None):
                sub._buffers[key] = b.to(device=device, dtype=torch.float32)
            elif device is not None:
                sub._buffers[key] = b.to(device=device)


class LossTerms:
    """Running [sum, count] of each named term of a layer's router loss since the last reset (for the training
    log: train.py averages them over layers into aux/<term>), accumulated without gradients."""

    def __init__(self, layer: AdapterLayer, names: tuple[str, ...]):
        self.names = tuple(names)
        layer.register_buffer("stat_terms", torch.zeros(len(self.names), 2), persistent=False)
        self.layer = layer

    @torch.no_grad()
    def record(self, terms: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            if name in terms:
                self.layer.stat_terms[i, 0] += terms[name].detach().float()
                self.layer.stat_terms[i, 1] += 1

    def summary(self) -> dict[str, float]:
        sums = self.layer.stat_terms.tolist()
        return {name: total / count for name, (total, count) in zip(self.names, sums) if count > 0}

    def reset(self) -> None:
        self.layer.stat_terms.zero_()


class RouterStats:
    """Running load counts and gate entropy of one router, accumulated without gradients."""

    def __init__(self, layer: AdapterLayer, n_experts: int):
        self.n_experts = n_experts
        layer.register_buffer("stat_load", torch.zeros(n_experts), persistent=False)
        layer.register_buffer("stat_tokens", torch.zeros(()), persistent=False)
        layer.register_buffer("stat_entropy", torch.zeros(()), persistent=False)
        self.layer = layer

    @torch.no_grad()
    def record(self, selected: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None) -> None:
        """selected: [N, k] expert ids; gates: [N, k] normalised weights; mask: [N] real tokens."""
        if in_backward():
            return
        layer = self.layer
        weight = count_selections(layer.stat_load, selected, mask)
        p = gates.float().clamp_min(1e-12)
        p = p / p.sum(-1, keepdim=True)
        layer.stat_entropy += (-(p * p.log()).sum(-1) * weight).sum()
        layer.stat_tokens += weight.sum()

    def summary(self) -> dict:
        layer = self.layer
        load = layer.stat_load.float()
        tokens = float(layer.stat_tokens)
        total = float(load.sum())
        frac = (load / total) if total > 0 else load
        nz = frac[frac > 0]
        load_entropy = float(-(nz * nz.log()).sum() / math.log(self.n_experts)) if self.n_experts > 1 and total > 0 else 0.0
        return {
            "tokens": int(tokens),
            "load": [round(float(f), 6) for f in frac],
            "load_entropy": load_entropy,  # 1.0 = perfectly balanced load over experts
            "gate_entropy": float(layer.stat_entropy) / tokens if tokens else 0.0,  # mean per-token, nats
            "max_load": float(frac.max()) if total > 0 else 0.0,
            "dead": [i for i, c in enumerate(load.tolist()) if c == 0] if tokens else [],
        }

    def reset(self) -> None:
        for name in ("stat_load", "stat_tokens", "stat_entropy"):
            getattr(self.layer, name).zero_()
