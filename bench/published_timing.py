"""The published FDFO training (github.com/NVlabs/finite-difference-flow-optimization, its train.py), run unchanged
and timed from outside: the child process of bench/side_by_side.py that runs the published side.

python bench/published_timing.py --published CHECKOUT --out published.json -- --num-epochs 2 \\
    --total-pairs-per-epoch 16 --reward-preset pickscore

Run it from a folder holding the models under their Hub ids and prompt_sets/pickscore_train.txt (side_by_side.py
writes them there); everything after `--` is the published train.py's command line. It must not import our `fdfo`:
the published code's package has the same name, and that one is imported here, the checkout first on sys.path.

Measured by wrapping published functions (none of its files is changed): the moment of every VRAMProfiler checkpoint
(after a synchronize) with its memory numbers; per epoch, the seconds spent in StableDiffusion3Pipeline.encode_prompt,
sample_image_pairs and RewardEngine.compute_weighted_rewards (each call between two torch.cuda.synchronize); the
moment of every optimiser step (GradScaler.step, synchronised after). An epoch runs from its VRAMProfiler.reset_peak
to its "end (after cleanup)" checkpoint: "batching" is from "after all N sample batches accumulated" to "after
all-gather + batching" (rollout logging, text-encoder offload, the shuffle), "training" from there to the end; its
peak memory is the end checkpoint's peak since the reset. Times are time.time(), so that the driver can measure
from the moment it started this process.
"""

from __future__ import annotations

import time

LAUNCH = time.time()  # before the heavy imports

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib.machinery  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

PUBLISHED_FILES = ("train.py", "fdfo/train_loop.py", "fdfo/utils.py", "fdfo/rewards.py", "fdfo/sampling.py")
# The checkpoints an epoch is cut at: the published label after "Epoch N: " → the moment's name here.
EPOCH_MOMENTS = {r"after all \d+ sample batches accumulated": "sampled",
                 r"after all-gather \+ batching \(samples freed\)": "batched",
                 r"end \(after cleanup\)": "end"}

EPOCH_STARTS: list[float] = []  # the moment of each epoch's VRAMProfiler.reset_peak
CHECKPOINTS: list[dict] = []  # every VRAMProfiler checkpoint: label, moment, memory
SECONDS: defaultdict[int, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))  # epoch (−1: set-up) → call → s
STEPS: list[float] = []  # the moment each optimiser step was done
BATCHES: dict = {}  # the batch sizes the published train.py chose


def published_checkout(path: Path) -> Path:
    """`path`, resolved, if it is a checkout of the published code; else the sentence that says it is not."""
    missing = [name for name in PUBLISHED_FILES if not (path / name).is_file()]
    if missing:
        raise SystemExit(f"--published {path} is not a checkout of the published code "
                         f"(github.com/NVlabs/finite-difference-flow-optimization): it has no {', '.join(missing)}.")
    return path.resolve()


def stand_in_for_wandb() -> bool:
    """Whether wandb is missing and a bare module stands in for it: the published logger imports it at the top and
    calls it only with --log-wandb."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("wandb")
        stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # diffusers' find_spec("wandb") reads it
        sys.modules["wandb"] = stand_in
        return True
    return False


def current_epoch() -> int:
    return len(EPOCH_STARTS) - 1


def timed(name: str, function):
    """`function`, the seconds of each call (its GPU work included) added to the current epoch's `name`."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.time()
        result = function(*args, **kwargs)
        torch.cuda.synchronize()
        SECONDS[current_epoch()][name] += time.time() - start
        return result
    return wrapper


def gib(nbytes: int) -> float:
    return nbytes / 2**30


def noted_checkpoint(checkpoint):
    @functools.wraps(checkpoint)
    def wrapper(self, label: str):
        torch.cuda.synchronize(self.device)  # as the checkpoint does first: its moment is when the GPU is done
        CHECKPOINTS.append({"label": label, "time": time.time(),
                            "allocated_gib": gib(torch.cuda.memory_allocated(self.device)),
                            "peak_allocated_gib": gib(torch.cuda.max_memory_allocated(self.device)),
                            "peak_reserved_gib": gib(torch.cuda.max_memory_reserved(self.device))})
        return checkpoint(self, label)
    return wrapper


def noted_epoch_start(reset_peak):
    @functools.wraps(reset_peak)
    def wrapper(self):
        torch.cuda.synchronize(self.device)
        EPOCH_STARTS.append(time.time())
        return reset_peak(self)
    return wrapper


def noted_step(step):
    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        torch.cuda.synchronize()
        STEPS.append(time.time())
        return result
    return wrapper


def noted_batches(configure):
    @functools.wraps(configure)
    def wrapper(config):
        configure(config)
        BATCHES.update(sample_batch_size=config.sample.batch_size,
                       num_sample_batches=config.sample.num_batches_per_epoch, train_batch_size=config.train.batch_size,
                       gradient_accumulation_steps=config.train.gradient_accumulation_steps,
                       gradient_steps_per_epoch=config.gradient_steps_per_epoch)
    return wrapper


def instrument(published: Path) -> types.ModuleType:
    """The published train module, with the functions above wrapped around theirs."""
    sys.path.insert(0, str(published))
    import fdfo  # the published one has no __init__.py: a regular package later on sys.path (ours) would win
    if [Path(p).resolve() for p in fdfo.__path__] != [published / "fdfo"]:
        raise SystemExit(f"`import fdfo` found {list(fdfo.__path__)}, not the published package {published / 'fdfo'} "
                         "alone: run this script where our fdfo is not importable (not installed, not on PYTHONPATH).")
    import train
    from diffusers import StableDiffusion3Pipeline
    from fdfo import rewards, train_loop, utils
    from torch.amp.grad_scaler import GradScaler

    utils.VRAMProfiler.checkpoint = noted_checkpoint(utils.VRAMProfiler.checkpoint)
    utils.VRAMProfiler.reset_peak = noted_epoch_start(utils.VRAMProfiler.reset_peak)
    GradScaler.step = noted_step(GradScaler.step)
    StableDiffusion3Pipeline.encode_prompt = timed("encode", StableDiffusion3Pipeline.encode_prompt)
    train_loop.sample_image_pairs = timed("sampling", train_loop.sample_image_pairs)  # train_loop's own name for it
    rewards.RewardEngine.compute_weighted_rewards = timed("rewards", rewards.RewardEngine.compute_weighted_rewards)
    train.configure_training_batches = noted_batches(train.configure_training_batches)
    return train


def epoch_moments() -> dict[int, dict[str, dict]]:
    """Epoch → moment name → its checkpoint."""
    moments: defaultdict[int, dict[str, dict]] = defaultdict(dict)
    for checkpoint in CHECKPOINTS:
        epoch_label = re.fullmatch(r"Epoch (\d+): (.*)", checkpoint["label"])
        for pattern, name in EPOCH_MOMENTS.items():
            if epoch_label and re.fullmatch(pattern, epoch_label.group(2)):
                moments[int(epoch_label.group(1))][name] = checkpoint
    return moments


def epoch_phases() -> list[dict]:
    """The seconds of each phase and the peak memory of every epoch that ran to its end."""
    epochs = []
    for index, (epoch, at) in enumerate(sorted(epoch_moments().items())):
        if len(at) < len(EPOCH_MOMENTS):
            continue
        calls, start = SECONDS[index], EPOCH_STARTS[index]
        epochs.append({"epoch": epoch, "encode_s": calls["encode"], "sampling_s": calls["sampling"],
                       "rewards_s": calls["rewards"], "batching_s": at["batched"]["time"] - at["sampled"]["time"],
                       "training_s": at["end"]["time"] - at["batched"]["time"], "epoch_s": at["end"]["time"] - start,
                       "peak_gib": at["end"]["peak_allocated_gib"], "peak_reserved_gib": at["end"]["peak_reserved_gib"]})
    if not epochs:
        raise SystemExit("The published run logged no whole epoch: its VRAMProfiler labels "
                         f"({sorted({c['label'] for c in CHECKPOINTS})}) lack those this script cuts epochs at "
                         f"({list(EPOCH_MOMENTS)}).")
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the published train.py, timed per phase of each epoch.")
    parser.add_argument("--published", type=Path, required=True, help="checkout of the published code")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the timings")
    parser.add_argument("train_args", nargs="*", help="after --: the published train.py's command line")
    args = parser.parse_args()
    published = published_checkout(args.published)
    wandb_stand_in = stand_in_for_wandb()
    if wandb_stand_in and "--log-wandb" in args.train_args:
        raise SystemExit("--log-wandb needs wandb, which is not installed here.")
    train = instrument(published)
    sys.argv = [str(published / "train.py"), *args.train_args]
    train.main()
    result = {
        "command": sys.argv, "wandb": "a bare stand-in module (not installed)" if wandb_stand_in else "installed",
        "launch": LAUNCH, "end": time.time(), "batches": BATCHES, "epochs": epoch_phases(), "step_times": STEPS,
        "launch_to_first_optimiser_step_s": STEPS[0] - LAUNCH if STEPS else None,
        "set_up_encode_s": SECONDS[-1]["encode"], "epoch_starts": EPOCH_STARTS, "checkpoints": CHECKPOINTS,
        "seconds_per_epoch": {str(epoch): dict(calls) for epoch, calls in sorted(SECONDS.items())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
