"""Reward cost on a GPU: time per image and peak memory of PickScore and Qwen2.5-VL-7B (random full-size weights).

One GPU:   python bench/rewards.py --out results.json
Sharded:   torchrun --standalone --nproc_per_node=2 bench/rewards.py --out results.json --shard
The reward code is the training code (fdfo.rewards); only the weights are random (same FLOPs and memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo import distributed  # noqa: E402
from fdfo.rewards.clip_score import ClipScore  # noqa: E402
from fdfo.rewards.twins import random_clip, random_qwen_vl  # noqa: E402
from fdfo.rewards.vlm import TRAIN_QUESTION, YesNoVlm, cast_buffers  # noqa: E402

PROMPT = "a photograph of a red fox sitting in fresh snow under a pine tree, golden hour, highly detailed"


def timed(fn, device, warmup=2, repeats=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=12, help="images per call (2 × the default sampling batch of 6)")
    parser.add_argument("--shard", action="store_true", help="shard the VLM over the torchrun ranks (FSDP2)")
    args = parser.parse_args()
    device = distributed.init()
    images = torch.rand(args.batch, 3, 512, 512, device=device)
    prompts = [PROMPT] * args.batch
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "world_size": distributed.world_size(), "batch": args.batch, "image_px": 512}

    if not args.shard:
        torch.cuda.reset_peak_memory_stats(device)
        pick = ClipScore(*random_clip(size="full", device=device), device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(lambda: pick(images, prompts), device)
        results["pickscore"] = {"ms_per_batch": 1000 * seconds, "ms_per_image": 1000 * seconds / args.batch,
                                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
        del pick
        torch.cuda.empty_cache()

    model, processor = random_qwen_vl(size="7b", device=device, dtype=torch.bfloat16)
    vlm = YesNoVlm(model, processor, device, shard=args.shard)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    weights = torch.cuda.memory_allocated(device) / 2**30
    questions = [TRAIN_QUESTION.format(prompt=p) for p in prompts]
    score = lambda: vlm.score(images, questions, resize=504)  # noqa: E731
    seconds = timed(score, device)
    results["vlm_7b" + ("_sharded" if vlm.sharded else "")] = {
        "ms_per_batch": 1000 * seconds, "ms_per_image": 1000 * seconds / args.batch,
        "resident_gib": weights, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}

    packed_scores = score()
    # The same call with transformers' own vision attention (one SDPA call per window), against the packed one.
    vision_config = vlm.model.config.vision_config
    vision_config._attn_implementation = "sdpa"
    seconds = timed(score, device)
    results["vlm_7b_stock_vision_attention"] = {
        "ms_per_batch": 1000 * seconds, "ms_per_image": 1000 * seconds / args.batch,
        "max_abs_score_difference_vs_packed": (score() - packed_scores).abs().max().item(),
        "max_abs_score_difference_stock_run_to_run": (score() - score()).abs().max().item(),
        "packed_scores": packed_scores.tolist()}

    # The published training reward's bf16 buffers (its FSDP1 mixed precision rounds the rotary frequencies).
    exact = score()
    cast_buffers(vlm.model, torch.bfloat16)
    rounded = score()
    results["vlm_7b_bf16_buffers_vs_fp32"] = {
        "max_abs_score_difference": (rounded - exact).abs().max().item(),
        "mean_abs_score_difference": (rounded - exact).abs().mean().item(),
        "score_std_over_images": exact.std().item(), "fp32_buffer_scores": exact.tolist(),
        "bf16_buffer_scores": rounded.tolist()}

    gathered = distributed.all_gather_objects(results)
    if distributed.is_main():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(gathered, indent=2) + "\n")
        print(json.dumps(gathered, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
