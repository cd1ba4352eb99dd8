"""FDFO, Flow-GRPO and DiffusionNFT on the tiny model with the demo's reward, at equal reward evaluations.

python bench/compare_methods.py --out docs/compare_methods   (writes .png, .md and .json; CPU, offline)

Every run is the same command line but for --method: the demo's settings (configs/tiny.toml: brightness,
10 steps, learning rate 1e-2, one optimiser step per epoch), no CFG for any method, groups of 8 images of a
prompt for the baselines, and each baseline's own published settings otherwise ([grpo], [nft]). An epoch is 2 ×
--pairs reward evaluations for every method, so the curves share their x-axis; the transformer forward passes
(samples through the model, sampling and training) are in the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("fdfo", "flow_grpo", "diffusion_nft")


def run(method: str, seed: int, args: argparse.Namespace, runs_dir: Path) -> list[dict]:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--pretrained-model", "tiny", "--method", method,
                           "--seed", str(seed), "--num-epochs", str(args.epochs), "--total-pairs-per-epoch",
                           str(args.pairs), "--sample.guidance-scale", "1.0", "--runs-dir",
                           str(runs_dir / f"{method}-{seed}")], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method}, seed {seed} failed:\n{done.stderr[-3000:]}")
    (run_dir,) = (runs_dir / f"{method}-{seed}").iterdir()
    return [json.loads(line) for line in (run_dir / "training_log.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compare_methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for method in METHODS:
            results[method] = [run(method, seed, args, Path(scratch)) for seed in args.seeds]
            print(f"{method}: done", flush=True)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    rows = []
    for method, runs in results.items():
        x = np.array([r["reward_evaluations"] for r in runs[0]])
        rewards = np.array([[r["reward_mean"] for r in epochs] for epochs in runs])  # seeds × epochs
        mean, spread = rewards.mean(axis=0), rewards.std(axis=0)
        ax.plot(x, mean, label=method)
        ax.fill_between(x, mean - spread, mean + spread, alpha=0.2)
        last3 = rewards[:, -3:].mean(axis=1)  # per seed: the mean of its last three epochs
        rows.append((method, rewards[:, :3].mean(), last3.mean(), last3.std(), int(x[-1]),
                     runs[0][-1]["transformer_forwards"]))
    ax.set_xlabel("reward evaluations")
    ax.set_ylabel("mean brightness of the epoch's images")
    ax.set_title(f"tiny model, demo reward, mean ± std over {len(args.seeds)} seeds")
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    table = ["| method | reward, epochs 0–2 | reward, last 3 epochs (mean ± std over seeds) | reward evaluations | "
             "transformer forwards |", "|---|---|---|---|---|"]
    table += [f"| {m} | {a:.4f} | {b:.4f} ± {s:.4f} | {e} | {f} |" for m, a, b, s, e, f in rows]
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=1) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
