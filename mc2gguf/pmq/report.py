"""The PMQ report written next to the output: JSON of every expert's significance, errors and chosen
type, and heatmaps (layers x experts) of frequency, routing weight, error and chosen bits, as in the
MC-MoE paper's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .calibrate import router_norm_quantiles


def _experts_table(report: dict) -> list[dict]:
    rows = []
    chosen = report["allocation"].types
    for unit in report["units"]:
        rows.append({
            "layer": unit.layer, "expert": unit.expert, "projections": list(unit.projections),
            "phi": unit.phi, "mean_weight": unit.weight, "eps": unit.eps, "type": chosen[unit.key].name,
            "bits_per_weight": chosen[unit.key].bits_per_weight,
        })
    return rows


def write_report(out: Path, report: dict) -> tuple[Path, Path]:
    """``OUT.report.json`` and ``OUT.report.png``."""
    rows = _experts_table(report)
    layers = [
        {**{k: r[k] for k in ("layer", "n_tokens", "mu", "unused_experts")},
         "router_norm_quantiles": router_norm_quantiles(r["router_norms"])}
        for r in report["records"]
    ]
    allocation = report["allocation"]
    data = {
        "file_size": report["size"], "expert_bytes": allocation.expert_bytes, "objective": allocation.objective,
        "calibration": report["calibration"], "layers": layers, "experts": rows,
    }
    json_path = out.with_name(out.name + ".report.json")
    json_path.write_text(json.dumps(data, indent=1))
    png_path = out.with_name(out.name + ".report.png")
    _heatmaps(rows, png_path)
    return json_path, png_path


def _grid(rows: list[dict], value) -> np.ndarray:
    n_layers = max(r["layer"] for r in rows) + 1
    n_experts = max(r["expert"] for r in rows) + 1
    grid = np.zeros((n_layers, n_experts))
    weight = np.zeros((n_layers, n_experts))
    for r in rows:  # units of one expert (projection granularity) are averaged, weighted by their size
        n = len(r["projections"])
        grid[r["layer"], r["expert"]] += value(r) * n
        weight[r["layer"], r["expert"]] += n
    return grid / np.maximum(weight, 1)


def _heatmaps(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..quant.types import quant_type

    by_bits = sorted(rows[0]["eps"], key=lambda name: quant_type(name).bits_per_weight)
    reference_type = by_bits[len(by_bits) // 2]
    panels = [
        ("access frequency phi", lambda r: r["phi"]),
        ("mean routing weight w", lambda r: r["mean_weight"]),
        (f"eps at {reference_type}", lambda r: r["eps"].get(reference_type, np.nan)),
        ("chosen bits per weight", lambda r: r["bits_per_weight"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4 + 0.12 * max(r["layer"] for r in rows)), constrained_layout=True)
    for ax, (title, value) in zip(axes, panels):
        image = ax.imshow(_grid(rows, value), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
