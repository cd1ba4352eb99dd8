"""Pictures of a run: the reward curve, redrawn from training_log.jsonl after every epoch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REWARD_CURVE = "reward_curve.png"


def reward_panels(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(log key, title) of each panel: the total, and each term when the reward has several."""
    terms = [k.removeprefix("reward_") for k in record
             if k.startswith("reward_") and k not in ("reward_mean", "reward_std", "reward_evaluations")
             and not k.endswith("_std")]
    if len(terms) == 1:
        return [("reward", f"reward ({terms[0]})")]
    return [("reward", "total reward")] + [(f"reward_{t}", t) for t in terms]


def plot_reward_curve(epochs: list[dict[str, Any]], out: Path) -> None:
    """Mean ± standard deviation over the epoch's images of the total reward and of each term, against the
    epoch (bottom axis) and the reward evaluations made so far (top axis, the x-axis of the papers)."""
    panels = reward_panels(epochs[0])
    x = [r["epoch"] for r in epochs]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False, layout="constrained")
    for ax, (key, title) in zip(axes[0], panels):
        mean_key = "reward_mean" if key == "reward" else key
        mean = [r[mean_key] for r in epochs]
        std = [r[f"{key}_std"] for r in epochs]
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                        linewidth=0, label="± std over images")
        ax.plot(x, mean, marker="o", markersize=3, label="epoch mean")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        per_epoch = epochs[0]["reward_evaluations"] / (epochs[0]["epoch"] + 1)
        top = ax.secondary_xaxis("top", functions=(lambda e: (e + 1) * per_epoch, lambda n: n / per_epoch - 1))
        top.set_xlabel("reward evaluations")
    axes[0][0].legend(loc="best", fontsize="small")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, out)  # a viewer never sees a half-written picture
