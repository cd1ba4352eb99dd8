"""The published training code against ours on one GPU, with the same random full-size weights and settings: the
seconds of each phase of an epoch, its peak GPU memory, launch → first optimiser step and the whole command.

git clone https://github.com/NVlabs/finite-difference-flow-optimization .published/finite-difference-flow-optimization
python bench/side_by_side.py --published .published/finite-difference-flow-optimization --root /tmp/sbs \\
    --out bench/results/side-by-side-h200.json --pairs 16 --epochs 2 [-- FLAGS BOTH TRAIN.PYS TAKE]

Below --root it writes random weights in folders named as the Hub repos both codes read (SD3.5-Medium in bf16,
PickScore at its real shapes in fp32, CLIP-H's processor), and the prompts as prompt_sets/pickscore_train.txt; a
folder already there is kept. From --root, offline, it then runs the published train.py (through
bench/published_timing.py, which times it from outside) and ours, each with --reward-preset pickscore and otherwise
their defaults (40 steps, guidance 1, 512 px, LoRA r32, the fp16 recipe), a fresh process each, their output shown
and kept in ROOT/published.log and ROOT/ours.log. The table compares the last epoch (the first includes our
compile). Our "text encoding" includes bringing the text encoders and PickScore back to the GPU; the published
code's moves are in "other" (text encoders to the GPU at the epoch's start) and "batching" (back to the CPU).
--skip-published / --skip-ours reuse that side's result from ROOT; --size tiny writes the tiny models
instead, to try the script on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.published_timing import published_checkout  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402
from fdfo.rewards.twins import random_clip, save_processor_as_published  # noqa: E402
from fdfo.runs.runlog import CONFIG_FILE, read_log  # noqa: E402

SD35M = "stabilityai/stable-diffusion-3.5-medium"
PICKSCORE = "yuvalkirstain/PickScore_v1"
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor, as both codes read it
PROMPT_FILE = "prompt_sets/pickscore_train.txt"  # where the published code reads its prompts
SIZES = {"full": ("sd35m", "full"), "tiny": ("tiny", "tiny")}  # --size → (random_pipeline's size, random_clip's)
SIZE_FILE = ".bench-size"  # in each model folder: the --size it was written at
OFFLINE = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
OUR_TRAINING = ("exchange", "train", "train_sync", "optimizer")  # our timed phases of the optimisation
ROWS = [("text encoding", "encode_s"), ("sampling", "sampling_s"), ("rewards", "rewards_s"),
        ("batching", "batching_s"), ("training", "training_s"), ("other", "other_s"), ("epoch", "epoch_s"),
        ("peak memory (GiB)", "peak_gib")]
RUN_ROWS = [("launch → first optimiser step", "launch_to_first_step_s"),
            ("launch → last optimiser step", "launch_to_last_step_s"), ("whole command", "wall_s")]
VERSIONS = ("torch", "diffusers", "transformers", "peft", "tyro")


# ---- the models and prompts both runs read ---------------------------------------------------------------------

def write_once(folder: Path, size: str, write) -> None:
    """`write(temporary folder)`, then the temporary folder renamed to `folder`: a folder there is whole."""
    if folder.is_dir():
        written = (folder / SIZE_FILE).read_text() if (folder / SIZE_FILE).is_file() else None
        if written != size:
            raise SystemExit(f"{folder} holds " + (f"--size {written} weights" if written else "files not written by "
                             "this script") + f"; remove it or choose another --root for --size {size}.")
        print(f"kept {folder}")
        return
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    (partial / SIZE_FILE).write_text(size)
    partial.rename(folder)
    print(f"wrote {folder}")


def write_models(root: Path, size: str, prompts: Path) -> None:
    """The random models below `root`, in folders named as their Hub repos, and the prompts."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline_size, clip_size = SIZES[size]

    def sd35m(folder: Path) -> None:  # bf16, as the published weights are stored
        random_pipeline(pipeline_size, device=device, dtype=torch.bfloat16).save_pretrained(folder)

    def pickscore(folder: Path) -> None:  # fp32, as published
        model, processor = random_clip(size=clip_size, device=device)
        model.save_pretrained(folder)
        save_processor_as_published(processor, folder)

    def clip_h_processor(folder: Path) -> None:  # no weights: AutoProcessor finds the processor's class by the config
        model, processor = random_clip(size=clip_size, device="meta")
        model.config.save_pretrained(folder)
        save_processor_as_published(processor, folder)

    write_once(root / SD35M, size, sd35m)
    write_once(root / PICKSCORE, size, pickscore)
    write_once(root / CLIP_H, size, clip_h_processor)
    (root / PROMPT_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prompts, root / PROMPT_FILE)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs are other processes: leave them the GPU


# ---- the runs --------------------------------------------------------------------------------------------------

def run_teed(command: list[str], root: Path, log: Path) -> tuple[float, float]:
    """Run `command` from `root`, offline, its output shown and written to `log`; (start, end) as time.time()."""
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    with log.open("wb") as kept, subprocess.Popen(command, cwd=root, env=os.environ | OFFLINE, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT) as child:
        for chunk in iter(lambda: child.stdout.read1(1 << 16), b""):  # as it comes: progress bars end in \r
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            kept.write(chunk)
    end = time.time()
    if child.returncode:
        raise SystemExit(f"The command failed (exit code {child.returncode}); its output is in {log}.")
    return start, end


def train_flags(args) -> list[str]:
    return ["--reward-preset", "pickscore", "--num-epochs", str(args.epochs), "--total-pairs-per-epoch",
            str(args.pairs), *args.train_args]


def published_commit(checkout: Path) -> str | None:
    """The checkout's commit: git's, or a COMMIT file's (a copy without .git, where git would name the commit of a
    repository around it)."""
    if (checkout / ".git").exists():
        git = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False)
        if git.returncode == 0:
            return git.stdout.strip()
    commit_file = checkout / "COMMIT"
    return commit_file.read_text().strip() if commit_file.is_file() else None


def run_published(args, root: Path) -> dict:
    out = root / "published.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "bench" / "published_timing.py"), "--published", str(args.published),
               "--out", str(out), "--", *train_flags(args)]
    start, end = run_teed(command, root, root / "published.log")
    timing = json.loads(out.read_text())
    steps = timing["step_times"]
    return {"command": command, "commit": published_commit(args.published), "batches": timing["batches"],
            "epochs": [with_other(e) for e in timing["epochs"]], "launch_to_first_step_s": steps[0] - start,
            "launch_to_last_step_s": steps[-1] - start, "wall_s": end - start, "timing": timing}


def our_epoch(record: dict) -> dict:
    """Our epoch record's phases under the names of the published side's."""
    def seconds(*phases: str) -> float:
        return sum(record.get(f"time_{phase}", 0.0) for phase in phases)
    peaks = [v for k, v in record.items() if k.startswith("peak_vram_gib_")]
    return with_other({"epoch": record["epoch"], "encode_s": seconds("encode"), "sampling_s": seconds("sample"),
                       "rewards_s": seconds("reward"), "batching_s": seconds("share"),
                       "training_s": seconds(*OUR_TRAINING), "epoch_s": record["time_epoch"],
                       "peak_gib": max(peaks) if peaks else None})


def run_ours(args, root: Path) -> dict:
    runs = root / "runs-ours"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    command = [sys.executable, str(REPO / "train.py"), "--prompt-file", PROMPT_FILE, "--runs-dir", str(runs),
               *train_flags(args)]
    start, end = run_teed(command, root, root / "ours.log")
    (run_dir,) = set(runs.iterdir()) - before
    log = read_log(run_dir)
    steps = [row["wall_time"] for row in log if row["kind"] == "step"]
    records = [row for row in log if row["kind"] == "epoch"]
    return {"command": command, "run_dir": str(run_dir),
            "batch_plan": json.loads((run_dir / CONFIG_FILE).read_text())["batch_plan"],
            "epochs": [our_epoch(r) for r in records], "launch_to_first_step_s": steps[0] - start,
            "launch_to_last_step_s": steps[-1] - start, "wall_s": end - start,
            "epoch_records": [{k: v for k, v in r.items() if k.startswith(("time_", "peak_vram_"))} for r in records]}


def with_other(epoch: dict) -> dict:
    """`epoch` with `other_s`: its seconds outside the named phases."""
    named = ("encode_s", "sampling_s", "rewards_s", "batching_s", "training_s")
    return epoch | {"other_s": epoch["epoch_s"] - sum(epoch[k] for k in named)}


def side(args, root: Path, name: str, run) -> dict | None:
    """The side `name`: run now, or (skipped) its result from an earlier run in `root` if there is one."""
    saved = root / f"result-{name}.json"
    if getattr(args, f"skip_{name}"):
        return json.loads(saved.read_text()) if saved.is_file() else None
    result = run(args, root)
    saved.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- the report ------------------------------------------------------------------------------------------------

def table(published: dict | None, ours: dict | None) -> list[dict]:
    """Rows of the last epoch and the whole runs: published, ours, published / ours."""
    last = {name: result["epochs"][-1] if result else {} for name, result in [("published", published), ("ours", ours)]}
    runs = {"published": published or {}, "ours": ours or {}}
    rows = [(label, last["published"].get(key), last["ours"].get(key)) for label, key in ROWS]
    rows += [(label, runs["published"].get(key), runs["ours"].get(key)) for label, key in RUN_ROWS]
    return [{"row": label, "published": p, "ours": o, "published_over_ours": p / o if p is not None and o else None}
            for label, p, o in rows]


def markdown(rows: list[dict]) -> str:
    def cell(value: float | None, unit: str = "") -> str:
        return "—" if value is None else f"{value:.2f}{unit}"
    lines = ["| last epoch / run | published | ours | published / ours |", "|---|---:|---:|---:|"]
    lines += [f"| {r['row']} | {cell(r['published'])} | {cell(r['ours'])} | {cell(r['published_over_ours'], '×')} |"
              for r in rows]
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {package: version(package) for package in VERSIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description="The published training code against ours, timed per phase.")
    parser.add_argument("--published", type=Path, help="checkout of the published code")
    parser.add_argument("--root", type=Path, required=True, help="folder of the models, prompts, runs and logs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    parser.add_argument("--pairs", type=int, default=16, help="--total-pairs-per-epoch of both runs")
    parser.add_argument("--epochs", type=int, default=2, help="--num-epochs of both runs")
    parser.add_argument("--prompts", type=Path, default=REPO / "prompt_sets" / "demo.txt", help="training prompts")
    parser.add_argument("--size", choices=list(SIZES), default="full", help="full: SD3.5-M's shapes; tiny: CPU-sized")
    parser.add_argument("--skip-published", action="store_true", help="reuse the published side's result in --root")
    parser.add_argument("--skip-ours", action="store_true", help="reuse our side's result in --root")
    parser.add_argument("train_args", nargs="*", help="after --: flags both train.py's take, e.g. --sample.resolution")
    args = parser.parse_args()
    if not args.skip_published:
        if args.published is None:
            parser.error("--published CHECKOUT is needed unless --skip-published is given.")
        args.published = published_checkout(args.published)
    if not args.prompts.is_file():
        parser.error(f"--prompts {args.prompts}: there is no such file.")
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)

    write_models(root, args.size, args.prompts)
    published = side(args, root, "published", run_published)
    ours = side(args, root, "ours", run_ours)
    rows = table(published, ours)
    print(markdown(rows))
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "versions": versions(),
              "settings": {"pairs": args.pairs, "epochs": args.epochs, "size": args.size, "prompts": str(args.prompts),
                           "train_args": args.train_args},
              "last_epoch": rows, "published": published, "ours": ours}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
