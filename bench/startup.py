"""Where the start-up of a training run goes, on a GPU: launch → imports → set-up (base model, reward models, pinned
host copies) → first sampling call and first optimiser step (Inductor compiles in both) — and the epochs after.

python bench/startup.py --out bench/results/startup.json -- --num-epochs 5 --total-pairs-per-epoch 16

Everything after `--` goes to train.py's parser (`--pretrained-model sd35m-random`, the offline prompts and a
temporary run folder are set here). Run it twice with the same TORCHINDUCTOR_CACHE_DIR to see a cold and a warm
compile cache; each run is a fresh process, so imports and CUDA's start are counted every time.
"""

from __future__ import annotations

import time

LAUNCH = time.time()  # before the heavy imports

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.cli import parse_train_config  # noqa: E402
from fdfo.harness import learner, training_loop  # noqa: E402
from fdfo.runs.runlog import read_log  # noqa: E402

IMPORTED = time.time() - LAUNCH
SPANS: dict[str, list[float]] = {}  # name → [start, end] of its first call, seconds after launch


def spanned(name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.time() - LAUNCH
        try:
            return function(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            SPANS.setdefault(name, [start, time.time() - LAUNCH])
    return wrapper


PEAK_GIB = {"reserved": 0.0, "allocated": 0.0}  # the whole run's, though PhaseTimer resets the peaks per phase


def fold_peaks() -> None:
    if torch.cuda.is_available():
        PEAK_GIB["reserved"] = max(PEAK_GIB["reserved"], torch.cuda.max_memory_reserved() / 2**30)
        PEAK_GIB["allocated"] = max(PEAK_GIB["allocated"], torch.cuda.max_memory_allocated() / 2**30)


def instrument() -> None:
    reset = torch.cuda.reset_peak_memory_stats

    def folding_reset(device=None):
        fold_peaks()
        reset(device)
    torch.cuda.reset_peak_memory_stats = folding_reset
    training_loop.set_up = spanned("set_up (all)", training_loop.set_up)
    learner.load_backbone = spanned("base model built", learner.load_backbone)
    learner.build_reward = spanned("reward models built", learner.build_reward)
    parking = learner.Parking
    names = iter(["text encoders' pinned host copy", "reward models' pinned host copy",
                  "transformer's place holder (its host copy, where a budget needs one, comes after set-up)"])
    learner.Parking = lambda modules, device: spanned(next(names), parking)(modules, device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"]
    instrument()
    with tempfile.TemporaryDirectory() as runs:
        cfg = parse_train_config(["--pretrained-model", "sd35m-random", "--prompt-file", "prompt_sets/demo.txt",
                                  "--runs-dir", runs, *train_args])
        run = training_loop.train(cfg)
        log = read_log(run)
    end = time.time() - LAUNCH
    fold_peaks()
    steps = [row for row in log if row["kind"] == "step"]
    epochs = [row for row in log if row["kind"] == "epoch"]
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "args": train_args, "imports_s": IMPORTED,
        "spans_s": SPANS, "launch_to_first_optimiser_step_s": steps[0]["wall_time"] - LAUNCH,
        "launch_to_end_s": end, "peak_gib": PEAK_GIB,
        "epochs": [{k: round(v, 2) for k, v in e.items() if k.startswith(("time_", "peak_vram_gib_")) or k == "pairs_per_s"}
                   for e in epochs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
