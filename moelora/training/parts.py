"""Which parts of a model train, and at which learning rate: train.py's `stage`, `freeze_*` and `*_learning_rate`.

A model's trainable tensors fall in three parts: "adapters" (adapter layers, routers, classifiers: everything
the method trains), and, when it owns encoders, "encoders" (the feature extractors) and "projectors" (their maps
into the LM's embeddings). Each part can be frozen and gets its own optimizer parameter group, so the scheduler
scales every group's learning rate alike. `stage: align` turns the adapters off in the forward pass (not only
frozen: the LM runs as the base model on the projected features), as LLaVA's first stage.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..multimodal.encoders import MEDIA_KINDS, PARTS


def configure_parts(model, cfg) -> None:
    """Apply `cfg.stage` and the freezing switches to `model` (before its optimizer is built)."""
    align = cfg.stage == "align"
    if cfg.freeze_adapters or align:  # only what the method made trainable: frozen experts stay frozen anyway
        for name, p in model.named_parameters():
            if not name.startswith("encoders."):
                p.requires_grad_(False)
    if align:
        for layer in model.adapter_layers().values():
            layer.adapter_enabled = False
    encoders = model._modules.get("encoders")
    if encoders is not None:
        encoders.set_trainable(None if cfg.freeze_encoders is None else not cfg.freeze_encoders,
                               not cfg.freeze_projectors)
    if not model.trainable_parameters():
        raise ConfigError("freeze_adapters" if cfg.freeze_adapters else "freeze_encoders",
                          "nothing is left to train with these freezing switches and stage "
                          f"{cfg.stage!r} (is every part frozen?)")


def part_parameters(model) -> dict[str, list]:
    """{"adapters": [...], "encoders.image": [...], "encoders.audio": [...], "projectors.image": [...],
    "projectors.audio": [...]}: the model's trainable parameters by part (and, below the adapters, by modality)."""
    parts = {"adapters": [], **{f"{part}.{kind}": [] for part in PARTS for kind in MEDIA_KINDS}}
    owner = {}
    encoders = model._modules.get("encoders")
    if encoders is not None:
        for part, named in encoders.named_part_parameters().items():
            for name, p in named:  # names start with their modality: image.*, audio.*
                owner[id(p)] = f"{part}.{name.split('.', 1)[0]}"
    for p in model.trainable_parameters():
        parts[owner.get(id(p), "adapters")].append(p)
    return parts


def part_rate(value: float | dict | None, modality: str, default: float) -> float:
    """One part's rate for one modality: `value` is a rate, {modality: rate} (others: default), or None."""
    if isinstance(value, dict):
        value = value.get(modality)
    return default if value is None else value


def parameter_groups(model, learning_rate: float, encoder_learning_rate=None, projector_learning_rate=None) -> list[dict]:
    """AdamW parameter groups, one per part that trains, each with its learning rate (None: learning_rate).
    train.py passes its config's rates; a Trainer script passes the same to its own optimizer:
    ``torch.optim.AdamW(moelora.parameter_groups(model, 1e-3, encoder_learning_rate={"image": 3e-3}))``.

    A part whose rate is a mapping {image: ..., audio: ...} gets one group per modality ("encoders.image"); a
    part with one rate keeps one group ("encoders"), so runs that do not split keep their optimizer layout."""
    rates = {"encoders": encoder_learning_rate, "projectors": projector_learning_rate}
    for part, value in rates.items():
        unknown = sorted(set(value) - set(MEDIA_KINDS)) if isinstance(value, dict) else []
        if unknown:
            raise ConfigError(f"{part[:-1]}_learning_rate", f"names {', '.join(map(str, unknown))}; the "
                              f"modalities are {', '.join(MEDIA_KINDS)}")
    groups: dict[str, dict] = {}
    for key, params in part_parameters(model).items():
        if not params:
            continue
        part, _, modality = key.partition(".")
        lr = learning_rate if part == "adapters" else part_rate(rates[part], modality, learning_rate)
        name = key if isinstance(rates.get(part), dict) else part
        group = groups.setdefault(name, {"params": [], "lr": lr, "name": name})
        group["params"].extend(params)
    return list(groups.values())


def logged_rates(param_groups) -> dict[str, float]:
    """What a log record says about learning rates: "lr", the adapters' rate (the first group's where the
    adapters do not train, as in `stage: align`), and with more than one group "lr/<group>" for each, so a run
    with per-part or per-modality rates logs every rate it trains with, not one of them as if it were all."""
    rates = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(param_groups)}
    record = {"lr": rates.get("adapters", next(iter(rates.values())))}
    if len(rates) > 1:
        record.update({f"lr/{name}": lr for name, lr in rates.items()})
    return record
