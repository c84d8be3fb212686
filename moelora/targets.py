"""Which linear projections of a base model an adapter wraps: `target_modules` and its defaults.

Matching follows PEFT, so a PEFT user's `target_modules` selects the same layers here:

    ["q_proj", "v_proj"]          a module whose name is, or ends with "." + an entry
    ["self_attn.q_proj"]          (dotted suffixes too: matches model.layers.0.self_attn.q_proj)
    "all-linear"                  every nn.Linear / Conv1D except the output head (lm_head)
    "model\\..*\\.q_proj"           any other string: a regular expression over the full name (re.fullmatch)
    None                          the architecture's default (ARCHITECTURE_TARGETS), all-linear if unknown

Methods differ in what they adapt by default: most wrap every projection of a block ("all"), the
LoRA-expert methods the attention projections ("attention", `MethodConfig.default_targets`).
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from .config import suggest
from .errors import ConfigError
from .layer import linear_dims

ALL_LINEAR_KEYWORD = "all-linear"

_LLAMA = {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
# Per `config.model_type`: the block's attention and MLP projections (names as in transformers 5.x).
ARCHITECTURE_TARGETS: dict[str, dict[str, list[str]]] = {
    "llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "mistral": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "gemma3_text": _LLAMA, "smollm3": _LLAMA,
    # GPT-2's c_proj is both the attention output and the MLP output: dotted suffixes tell them apart.
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "phi": {"attention": ["q_proj", "k_proj", "v_proj", "dense"], "mlp": ["fc1", "fc2"]},
    "phi3": {"attention": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
}


def _is_adaptable(module: nn.Module) -> bool:
    try:
        linear_dims(module)
        return True
    except TypeError:
        return False


def default_target_modules(model: nn.Module, role: str = "all") -> list[str] | str:
    """The architecture's projections for `role` ("all" or "attention"); all-linear for unknown architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = ARCHITECTURE_TARGETS.get(model_type)
    if table is None:
        return ALL_LINEAR_KEYWORD
    return list(table["attention"]) if role == "attention" else table["attention"] + table["mlp"]


def resolve_default_targets(model: nn.Module, config):
    """`config` itself when it names its targets, else a copy naming the default ones (recorded in saved
    configs, so a checkpoint says what it adapts). Configs may derive them from their inputs first
    (`targets_from_inputs`: experts loaded from PEFT folders bring their own)."""
    if config.target_modules is not None:
        return config
    from_inputs = getattr(config, "targets_from_inputs", None)
    targets = (from_inputs() if from_inputs else None) or default_target_modules(
        model, getattr(config, "default_targets", "all"))
    resolved = dataclasses.replace(config, target_modules=targets)
    prefix = getattr(config, "_instance_prefix", None)
    if prefix:
        object.__setattr__(resolved, "_instance_prefix", prefix)
    return resolved


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Full names of the linear projections `target_modules` selects (module docstring; PEFT's rules)."""
    if target_modules is None:
        target_modules = default_target_modules(model)
    candidates = [n for n, m in model.named_modules() if n and _is_adaptable(m)]
    if target_modules == ALL_LINEAR_KEYWORD:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in candidates if head is None or model.get_submodule(n) is not head]
    elif isinstance(target_modules, str):
        names = [n for n in candidates if re.fullmatch(target_modules, n)]
    else:
        wanted = list(dict.fromkeys(target_modules))
        names = [n for n in candidates if any(_matches(n, t) for t in wanted)]
        leaves = {n.split(".")[-1] for n in candidates}
        for t in wanted:
            if not any(_matches(n, t) for n in candidates):
                leaf = t.split(".")[-1]
                raise ConfigError("method.target_modules", f"no linear layer named '{t}' in this model"
                                  f"{suggest(leaf, leaves)}; available: {', '.join(sorted(leaves))}")
    if not names:
        raise ConfigError("method.target_modules", f"{target_modules!r} matched no linear layer")
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Every adaptable linear of a model, an adapted one under its own name (not its `.base_layer`)."""
    from .layer import AdapterLayer

    adapted = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    inner = {f"{n}.base_layer" for n in adapted}
    return adapted + [n for n, m in model.named_modules() if n and n not in inner and _is_adaptable(m)]


def peft_target_modules(all_linear_names: list[str], adapted: list[str]) -> list[str] | str:
    """`target_modules` for a PEFT adapter_config.json that selects exactly `adapted` among the model's
    linear layers: the leaf names when they select no more than that, else a regex of the full names."""
    leaves = sorted({n.split(".")[-1] for n in adapted})
    if {n for n in all_linear_names if n.split(".")[-1] in leaves} == set(adapted):
        return leaves
    return "|".join(re.escape(n) for n in sorted(adapted))
