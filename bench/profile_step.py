"""Where a training micro-batch and a sampling step spend their time on a GPU, and how the levers move them.

python bench/profile_step.py --out bench/results/profile-step.json

SD3.5-M transformer with random weights and a LoRA (B ≠ 0), 512 px, 205 text tokens, the default fp16
recipe, compiled blocks as in training. For each attention preference (PyTorch's own order; cuDNN first):
milliseconds per training micro-batch of 6, 10, 12 and 24 items (forward, surrogate loss, scaled backward) and
per sampling call of 12 and 24 images, with each one's peak memory; then a profile of
one micro-batch of 12 grouped by kernel kind (matrix products, attention, Triton-fused elementwise, copies).
`--guidance-scale` as in training (default 1.0: one row per item or image; with guidance ≠ 1 every item runs a
conditional and an unconditional row).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.numerics import sd35m_with_lora, timed_ms  # noqa: E402
from fdfo.model.compile import compile_blocks  # noqa: E402
from fdfo.formulas.estimator import normalise, surrogate_loss  # noqa: E402
from fdfo.model.backbone import PromptEmbeds  # noqa: E402
from fdfo.model.sd3 import predict_velocity  # noqa: E402

CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
KINDS = [("attention", ("flash", "fmha", "cudnn", "attn", "sdpa")), ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma")),
         ("triton (fused elementwise, norms)", ("triton",)), ("copies and casts", ("copy", "memcpy", "memset", "cast"))]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, patterns in KINDS if any(p in low for p in patterns)), "other")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device("cuda")
    transformer, _ = sd35m_with_lora(device)
    compile_blocks(list(transformer.transformer_blocks))
    scaler = torch.amp.GradScaler("cuda")

    def inputs(rows: int):
        def text(*shape):
            return torch.randn(*shape, device=device, dtype=torch.float16)
        cond = PromptEmbeds(text(rows, 205, 4096), text(rows, 2048), text(1, 205, 4096).expand(rows, -1, -1),
                            text(1, 2048).expand(rows, -1))
        return torch.randn(rows, 16, 64, 64, device=device), torch.rand(rows, device=device), cond

    def sample_call(rows: int):
        x, sigma, cond = inputs(rows)
        return lambda: predict_velocity(transformer, x, sigma[0], cond, args.guidance_scale)

    def train_call(items: int):
        x, sigma, cond = inputs(items)
        v_ref = torch.randn_like(x)
        d, dR = normalise(0.05 * torch.randn_like(x)), torch.linspace(-0.5, 1, items, device=device)

        def step():
            v = predict_velocity(transformer, x, sigma, cond, args.guidance_scale)
            scaler.scale(surrogate_loss(v, v_ref, d, dR, clip_range=0.03).loss).backward()
        return step

    def measure(fn, repeats=5):
        torch.cuda.reset_peak_memory_stats()
        ms = timed_ms(fn, repeats)
        return {"ms": ms, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "guidance_scale": args.guidance_scale}
    for preference in ("default", "cudnn_first"):
        torch._dynamo.reset()  # the attention kernel is chosen when a graph is compiled
        with sdpa_kernel(CUDNN_FIRST, set_priority=True) if preference == "cudnn_first" else contextlib.nullcontext():
            row = {}
            for rows in (12, 24):
                with torch.no_grad():
                    row[f"sampling_{rows}_images"] = measure(sample_call(rows))
            for items in (6, 10, 12, 24):
                timing = measure(train_call(items))
                row[f"training_micro_batch_{items}"] = timing | {"ms_per_item": timing["ms"] / items}
            results[preference] = row
            print(preference, json.dumps(row), flush=True)
            if preference == "default":
                step = train_call(12)
                step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                by_kind, top = defaultdict(float), []
                for event in prof.key_averages():
                    us = event.device_time_total
                    if us > 0:
                        by_kind[kind(event.key)] += us / 3 / 1000
                        top.append((us / 3 / 1000, event.key[:90]))
                results["profile_training_micro_batch_12_ms"] = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
                results["profile_top_kernels_ms"] = [[round(ms, 3), name] for ms, name in sorted(top, reverse=True)[:25]]
                print(json.dumps(results["profile_training_micro_batch_12_ms"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
