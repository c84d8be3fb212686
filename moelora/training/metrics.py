"""Metric sinks for a training run: console (via the progress bar), JSONL, TensorBoard.

Only the main process writes. Each record is one flat dict of numbers keyed by name, so the JSONL
log reads back with one `json.loads` per line and plots without further parsing.
"""

from __future__ import annotations

import json
from pathlib import Path


def summarise_router_stats(stats: dict[str, dict]) -> dict[str, float]:
    """Model-wide router health from `MoELoRAModel.router_stats()` (README "Logged metrics" defines each):
    load_entropy (normalised by log E, 1 = even) and gate_entropy (nats per token) are means over layers,
    max_load the largest one-expert load fraction of any layer, dead_experts a count summed over layers."""
    if not stats:
        return {}
    n = len(stats)
    out = {
        "router/load_entropy": sum(s["load_entropy"] for s in stats.values()) / n,
        "router/gate_entropy": sum(s["gate_entropy"] for s in stats.values()) / n,
        "router/max_load": max(s["max_load"] for s in stats.values()),
        "router/dead_experts": float(sum(len(s["dead"]) for s in stats.values())),
    }
    # Router-loss terms a method reports per layer (LoRA-Mixer: balance, entropy, preserve) -> aux/<term>,
    # averaged over the layers that report them, so each coefficient's effect can be read in the log.
    terms: dict[str, list[float]] = {}
    for s in stats.values():
        for name, value in s.get("loss_terms", {}).items():
            terms.setdefault(name, []).append(value)
    out.update({f"aux/{name}": sum(v) / len(v) for name, v in terms.items()})
    return out


def router_health(stats: dict[str, dict], min_load_entropy: float) -> dict[str, list]:
    """Layers whose router collapsed (normalised load entropy below `min_load_entropy`: a few experts
    take almost all the load) and layers with experts that received no token in the window."""
    multi = {name: s for name, s in stats.items() if len(s["load"]) > 1 and s["tokens"] > 0}
    return {
        "collapsed": sorted(n for n, s in multi.items() if s["load_entropy"] < min_load_entropy),
        "dead": sorted(f"{n}:{len(s['dead'])}" for n, s in multi.items() if s["dead"]),
    }


def name_layers(names: list[str], most: int = 4) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


class MetricsLogger:
    def __init__(self, output_dir: Path, report_to: list[str], enabled: bool, append: bool = False):
        self.enabled = enabled and "none" not in report_to
        self.jsonl = None
        self.tb = None
        if not self.enabled:
            return
        if "jsonl" in report_to:
            self.jsonl = open(output_dir / "log.jsonl", "a" if append else "w")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
