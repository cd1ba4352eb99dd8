"""Epoch benchmark on a GPU: the real training loop (fdfo.harness.training_loop.train) at SD3.5-M shapes with random
weights (or another random model's: `-- --pretrained-model sd35l-random|flux-random`).

python bench/epoch.py --out bench/results/epoch.json -- --total-pairs-per-epoch 24 --num-epochs 1
(everything after `--` goes to train.py's parser; `--pretrained-model sd35m-random` and the offline
prompt file are set here, so the reward models are random full-size PickScore and Qwen2.5-VL-7B.)

Reports per phase (from the run's own training_log.jsonl): wall time, peak VRAM, pairs/s; FLOPs of the
transformer counted once with torch's FlopCounterMode; MFU against a bf16 matmul peak measured here.
"""

from __future__ import annotations

import time

LAUNCH = time.time()  # before the heavy imports: "launch to first optimiser step" counts them

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.cli import parse_train_config  # noqa: E402
from fdfo.model.loading import backbone_class  # noqa: E402
from fdfo.runs.runlog import read_log  # noqa: E402
from fdfo.harness.training_loop import train  # noqa: E402


def matmul_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def transformer_flops(model: str, resolution: int, max_sequence_length: int) -> tuple[float, float]:
    """(forward, LoRA forward+backward) FLOPs per sample of the random model `model`'s transformer (its real
    shapes), counted on the meta device."""
    from fdfo.model.loading import BACKBONES, RANDOM_MODELS
    from fdfo.model.lora import attach_lora
    from fdfo.model.tiny import SIZES
    kind, shape = SIZES[RANDOM_MODELS[model]][:2]
    backbone = BACKBONES[kind]
    with torch.device("meta"):
        lora = attach_lora(backbone.transformer_class(**shape), targets=backbone.lora_targets)
        side, width, pooled = resolution // 8, shape["joint_attention_dim"], shape["pooled_projection_dim"]
        if kind == "sd3":  # CLIP-L + CLIP-G's 77 tokens beside T5's; latents in 2×2 patches inside
            kwargs = dict(hidden_states=torch.randn(1, 16, side, side), timestep=torch.ones(1),
                          encoder_hidden_states=torch.randn(1, 77 + max_sequence_length, width),
                          pooled_projections=torch.randn(1, pooled), return_dict=False)
        else:  # FLUX: latents packed 2×2 into tokens outside, T5's tokens only, the guidance embedding
            tokens = (side // 2) ** 2
            kwargs = dict(hidden_states=torch.randn(1, tokens, 64), timestep=torch.ones(1), guidance=torch.ones(1),
                          encoder_hidden_states=torch.randn(1, max_sequence_length, width),
                          pooled_projections=torch.randn(1, pooled), img_ids=torch.zeros(tokens, 3),
                          txt_ids=torch.zeros(max_sequence_length, 3), return_dict=False)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            lora(**kwargs)
        forward = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            lora(**kwargs)[0].float().pow(2).mean().backward()
    return forward, counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the run (checkpoint included) here")
    parser.add_argument("--sdpa", choices=["default", "cudnn"], default="default",
                        help="cudnn: prefer cuDNN's attention kernel over flash attention for the whole run")
    args, train_args = parser.parse_known_args()
    train_args = [a for a in train_args if a != "--"]
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # each rank measures its own GPU
    peak = matmul_peak_tflops()
    with tempfile.TemporaryDirectory() as scratch:
        cfg = parse_train_config(["--pretrained-model", "sd35m-random", "--prompt-file", "prompt_sets/demo.txt",
                                  "--runs-dir", str(args.runs_dir or scratch), "--save-freq", "1000", *train_args])
        start = time.perf_counter()
        backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]
        with sdpa_kernel(backends, set_priority=True) if args.sdpa == "cudnn" else contextlib.nullcontext():
            run_dir = train(cfg)
        total = time.perf_counter() - start
        log = read_log(run_dir)
        plan = json.loads((run_dir / "config.json").read_text())["batch_plan"]
    epochs = [r for r in log if r["kind"] == "epoch"]
    steps = [r for r in log if r["kind"] == "step"]
    forward, train_step = transformer_flops(cfg.pretrained_model, cfg.sample.resolution or 512,
                                            cfg.sample.max_sequence_length)
    T, pairs = cfg.sample.num_solver_steps, plan["pairs_per_rank"] * plan["world_size"]
    guidance = 2 if backbone_class(cfg.pretrained_model).uses_cfg(cfg.sample.guidance_scale) else 1
    last = epochs[-1]
    # Training = every micro-batch (those that all-reduce gradients too); the sync ones' excess is the all-reduce.
    micro = {k: last.get(f"time_{k}", 0.0) for k in ("train", "train_sync")}
    last["time_training"] = micro["train"] + micro["train_sync"]
    n_steps = plan["gradient_steps_per_epoch"]
    n_local = n_steps * (plan["micro_batches_per_step"] - 1)
    exposed_allreduce = micro["train_sync"] - n_steps * micro["train"] / n_local if n_local else None
    flops = {"sample": 2 * pairs * T * forward * guidance, "training": 2 * pairs * T * train_step * guidance}
    floor = peak * 1e12 / ((flops["sample"] + flops["training"]) / pairs)  # pairs/s per GPU, transformer only
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul_peak_tflops": peak,
        "argv": sys.argv[1:], "batch_plan": plan, "wall_s_including_model_build": total,
        "launch_to_first_optimiser_step_s": steps[0]["wall_time"] - LAUNCH,
        "epochs": [{k: v for k, v in e.items() if k.startswith(("time_", "pairs_per_s", "peak_"))} for e in epochs],
        "pairs_per_s_per_gpu": last["pairs_per_s"] / plan["world_size"],
        # The floor and MFU count FDFO's FLOPs (T steps sampled and trained per image): none for the baselines.
        "compute_floor_pairs_per_s_per_gpu": floor if cfg.method == "fdfo" else None,
        "ratio_to_floor": last["pairs_per_s"] / plan["world_size"] / floor if cfg.method == "fdfo" else None,
        "gradient_allreduce_exposed_s": exposed_allreduce,
        "transformer_tflop_per_sample": {"forward": forward / 1e12, "lora_forward_backward": train_step / 1e12},
        "last_epoch": last, "ratio_dev_first_micro_batch": [s.get("ratio_dev_first_micro_batch") for s in steps if
                                                            "ratio_dev_first_micro_batch" in s],
        # Per GPU: each rank does 1/world_size of the epoch's FLOPs in the phase's time.
        "mfu": {phase: flops[phase] / plan["world_size"] / last[f"time_{phase}"] / 1e12 / peak for phase in flops}
        if cfg.method == "fdfo" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\n{'phase':<10} {'seconds':>9} {'peak GiB':>9}")
    for key, value in last.items():
        if key.startswith("time_"):
            phase = key[5:]
            print(f"{phase:<10} {value:>9.2f} {last.get(f'peak_vram_gib_{phase}', float('nan')):>9.1f}")
    print(f"pairs/s {last['pairs_per_s']:.3f}; transformer forwards {last['transformer_forwards']}; launch to first "
          f"step {result['launch_to_first_optimiser_step_s']:.0f} s")
    if result["mfu"]:
        print(f"({result['ratio_to_floor']:.2f} of the floor); MFU sample {result['mfu']['sample']:.2f}, training "
              f"{result['mfu']['training']:.2f} (bf16 matmul peak {peak:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
