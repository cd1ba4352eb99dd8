"""Every method on the tiny model with the demo's reward, at equal reward evaluations.

python bench/compare_methods.py --out docs/compare_methods   (writes .png, .md and .json; CPU, offline)

Every run is the same command line but for --method (and a variant's own flag): the demo's settings
(configs/tiny.toml: brightness — differentiable, so the gradient methods run on it too —, 10 steps, learning rate
1e-2, one optimiser step per epoch), no CFG for any method, and each method's own published settings otherwise
(the tiny preset's groups of 8 images, RSM's 2 branches at each of its four branching steps). An epoch is 2 ×
--pairs reward evaluations for every method, so the curves share their x-axis. The second panel's x-axis is the
transformer's cost: forward passes plus back-propagated passes times the measured cost of a backward pass in
forward passes, on this model at this resolution.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# label → train.py flags
VARIANTS = {"fdfo": ["--method", "fdfo"], "fdfo_grad (row I)": ["--method", "fdfo_grad"],
            "fdfo_grad (row J)": ["--method", "fdfo_grad", "--grad.chain"], "flow_grpo": ["--method", "flow_grpo"],
            "diffusion_nft": ["--method", "diffusion_nft"], "draft (K = 1)": ["--method", "draft"],
            "rsm": ["--method", "rsm"]}


def run(flags: list[str], seed: int, args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--pretrained-model", "tiny", *flags,
                           "--seed", str(seed), "--num-epochs", str(args.epochs), "--total-pairs-per-epoch",
                           str(args.pairs), "--sample.guidance-scale", "1.0", "--runs-dir", str(runs_dir)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{flags}, seed {seed} failed:\n{done.stderr[-3000:]}")
    (run_dir,) = runs_dir.iterdir()
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "epoch"]


def backward_multiple(resolution: int = 64, batch: int = 16, repeats: int = 20) -> float:
    """Seconds of a backward pass of the tiny LoRA transformer over those of a forward pass (median of
    `repeats`), at the demo's resolution and batch: what a back-propagated pass costs beside its forward."""
    from fdfo.model.lora import attach_lora
    from fdfo.model.tiny import random_pipeline
    model = attach_lora(random_pipeline("tiny").transformer)
    side = resolution // 8
    inputs = dict(hidden_states=torch.randn(batch, 16, side, side), timestep=torch.full((batch,), 500.0),
                  encoder_hidden_states=torch.randn(batch, 109, model.config.joint_attention_dim),
                  pooled_projections=torch.randn(batch, model.config.pooled_projection_dim), return_dict=False)
    forward, both = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        model(**inputs)[0].pow(2).mean().backward()
        both.append(time.perf_counter() - start)
    return (np.median(both) - np.median(forward)) / np.median(forward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compare_methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=None,
                        help="run these variants again and keep the others' curves (and the backward multiple) "
                             "from the last results (the .json at --out): after a change to those methods alone")
    args = parser.parse_args()
    kept = json.loads(args.out.with_suffix(".json").read_text()) if args.only else None
    multiple = kept["backward_multiple"] if kept else backward_multiple()
    print(f"a backward pass costs {multiple:.2f} forward passes here", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, flags in VARIANTS.items():
            if kept and label not in args.only:
                results[label] = kept["results"][label]
                continue
            results[label] = [run(flags, seed, args, Path(scratch) / f"{len(results)}-{seed}") for seed in args.seeds]
            print(f"{label}: done", flush=True)

    fig, (by_evaluations, by_cost) = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    rows = []
    for label, runs in results.items():
        x = np.array([r["reward_evaluations"] for r in runs[0]])
        cost = np.array([r["transformer_forwards"] + multiple * r["transformer_backwards"] for r in runs[0]])
        rewards = np.array([[r["reward_mean"] for r in epochs] for epochs in runs])  # seeds × epochs
        mean, spread = rewards.mean(axis=0), rewards.std(axis=0)
        for ax, axis in ((by_evaluations, x), (by_cost, cost)):
            ax.plot(axis, mean, label=label)
            ax.fill_between(axis, mean - spread, mean + spread, alpha=0.15)
        last3 = rewards[:, -3:].mean(axis=1)  # per seed: the mean of its last three epochs
        rows.append((label, rewards[:, :3].mean(), last3.mean(), last3.std(), int(x[-1]),
                     runs[0][-1]["transformer_forwards"], runs[0][-1]["transformer_backwards"], cost[-1]))
    by_evaluations.set_xlabel("reward evaluations")
    by_cost.set_xlabel(f"transformer passes (forward + {multiple:.2f} × backward)")
    by_evaluations.set_ylabel("mean brightness of the epoch's images")
    fig.suptitle(f"tiny model, demo reward, mean ± std over {len(args.seeds)} seeds")
    by_cost.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    table = ["| method | reward, epochs 0–2 | reward, last 3 epochs (mean ± std over seeds) | reward evaluations | "
             "transformer forwards | of them back-propagated | cost in forward passes |", "|---|---|---|---|---|---|---|"]
    table += [f"| {m} | {a:.4f} | {b:.4f} ± {s:.4f} | {e:,} | {f:,} | {k:,} | {c:,.0f} |"
              for m, a, b, s, e, f, k, c in rows]
    table += ["", f"A backward pass costs {multiple:.2f} forward passes (the tiny LoRA transformer, 16 images at 64 px, "
              "median of 20, on this machine)."]
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "backward_multiple": multiple, "results": results},
                                                        indent=1) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
