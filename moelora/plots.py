"""Router-utilisation plots (matplotlib, PNG) from `moelora.eval_suite.evaluate_tasks`' routing loads.

- `plot_layer_load`: one row per adapted layer, one column per expert (or rank), colour = share of the
  layer's routed tokens over all evaluated tasks. Dead experts show as white columns; collapse as one
  dark cell per row.
- `plot_task_routing`: one row per task, one column per expert, colour = load averaged over layers: does
  each task have experts of its own?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import DataError


def _layer_matrix(routing: dict[str, dict[str, list[float]]]) -> tuple[list[str], np.ndarray]:
    """Load per layer summed over tasks and renormalised: (layer names, [layers, experts])."""
    layers = sorted({name for per_layer in routing.values() for name in per_layer}, key=_layer_key)
    width = max(len(load) for per_layer in routing.values() for load in per_layer.values())
    mat = np.zeros((len(layers), width))
    for per_layer in routing.values():
        for i, name in enumerate(layers):
            load = per_layer.get(name)
            if load is not None:
                mat[i, : len(load)] += load
    sums = mat.sum(1, keepdims=True)
    return layers, np.divide(mat, sums, out=np.zeros_like(mat), where=sums > 0)


def _layer_key(name: str):
    # "model.layers.12.self_attn.q_proj" sorts by block number, then module.
    parts = name.split(".")
    return [int(p) if p.isdigit() else p for p in parts]


def _label_experts(ax, expert_names: list[str] | None) -> None:
    if expert_names:  # named experts (LoRA-Mixer, X-LoRA); ranks and factors are just numbered
        ax.set_xticks(range(len(expert_names)), expert_names, rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("expert" if expert_names else "expert / rank")


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def _heatmap(mat: np.ndarray, rows: list[str], row_fontsize: int, cmap: str, title: str, path: str | Path,
             expert_names: list[str] | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(4 + 0.12 * mat.shape[1], 14), 1.5 + (0.3 if row_fontsize > 5 else 0.16) * len(rows)))
    im = ax.imshow(mat, aspect="auto", cmap=cmap, interpolation="nearest", vmin=0)  # 0 = a dead expert
    ax.set_yticks(range(len(rows)), rows, fontsize=row_fontsize)
    _label_experts(ax, expert_names)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check(routing: dict, title: str) -> None:
    if not routing:
        raise DataError(f"no routing statistics to plot for {title} (the method has no learned router)")


def plot_layer_load(routing: dict, path: str | Path, title: str, expert_names: list[str] | None = None) -> Path:
    _check(routing, title)
    layers, mat = _layer_matrix(routing)
    return _heatmap(mat, [_short(n) for n in layers], 5, "viridis", f"{title}: load per layer (all tasks)", path,
                    expert_names)


def plot_task_routing(routing: dict, path: str | Path, title: str, expert_names: list[str] | None = None) -> Path:
    _check(routing, title)
    tasks = list(routing)
    width = max(len(load) for per_layer in routing.values() for load in per_layer.values())
    mat = np.zeros((len(tasks), width))
    for i, task in enumerate(tasks):
        loads = [np.pad(np.asarray(v, float), (0, width - len(v))) for v in routing[task].values()]
        mat[i] = np.mean(loads, axis=0)
    return _heatmap(mat, tasks, 7, "magma", f"{title}: load per task (mean over layers)", path, expert_names)
