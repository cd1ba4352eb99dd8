"""Compiled vs plain transformer on a GPU at SD3.5-M shapes: same velocities, loss and LoRA gradients? How fast?

python bench/numerics.py --out bench/results/numerics.json

Random weights (`sd35m_transformer`), a LoRA with non-zero B, bf16 autocast as in training, 512 px and
205 text tokens. Sampling batch 12 (6 pairs) without grad; training micro-batch 6 with the surrogate
loss and backward. Reports differences (max relative for velocities, relative norm for gradients),
ρ − 1 on the sampling policy for each path, milliseconds per call and the compile time of each graph.
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
from fdfo.model.compile import compile_blocks  # noqa: E402
from fdfo.formulas.estimator import normalise, surrogate_loss  # noqa: E402
from fdfo.model.lora import attach_lora  # noqa: E402
from fdfo.model.backbone import PromptEmbeds  # noqa: E402
from fdfo.model.sd3 import predict_velocity  # noqa: E402
from fdfo.model.tiny import default_dtype, sd35m_transformer  # noqa: E402


def timed_ms(fn, repeats=10):
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def first_call_s(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def sd35m_with_lora(device: torch.device):
    """SD3.5-M's transformer with random bf16 weights and a LoRA whose B is non-zero (so that it matters)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(torch.bfloat16):
        transformer = sd35m_transformer(device)
    lora = attach_lora(transformer)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    return transformer, lora


def step_inputs(device: torch.device):
    """A sampling batch of 12 at σ = 0.6 and a training micro-batch of 6 of its rows, with finite-difference
    directions d, reward differences dR and a shift off the sampling policy (so that ρ ≠ 1)."""
    x = torch.randn(12, 16, 64, 64, device=device)
    cond = PromptEmbeds(torch.randn(12, 205, 4096, device=device, dtype=torch.bfloat16),
                        torch.randn(12, 2048, device=device, dtype=torch.bfloat16))
    sigma = torch.tensor(0.6, device=device)
    rows = torch.arange(0, 12, 2, device=device)
    d = normalise(0.05 * torch.randn(6, 16, 64, 64, device=device))
    dR = torch.linspace(-0.5, 1, 6, device=device)
    shift = 0.002 * torch.randn(6, 16, 64, 64, device=device)
    return x, cond, sigma, rows, d, dR, shift


def step_calls(lora, inputs, compute_dtype: torch.dtype, scale: float = 1.0):
    """(sample, train_step) on `step_inputs`: a sampling batch's velocities, and a training micro-batch's surrogate
    terms and LoRA gradient off reference velocities `v_ref`, the loss multiplied by `scale` (fp16's loss scale)."""
    x, cond, sigma, rows, d, dR, _ = inputs
    c = cond.to(compute_dtype)

    def sample():
        with torch.no_grad():
            return predict_velocity(lora.base_model.model, x, sigma, c, 1.0)

    def train_step(v_ref):
        lora.zero_grad(set_to_none=True)
        v = predict_velocity(lora.base_model.model, x[rows], sigma.expand(len(rows)), c.index(rows), 1.0)
        terms = surrogate_loss(v, v_ref, d, dR, clip_range=0.03)
        (scale * terms.loss).backward()
        return terms, torch.cat([p.grad.flatten() for p in lora.parameters() if p.requires_grad]) / scale
    return sample, train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    transformer, lora = sd35m_with_lora(device)

    inputs = step_inputs(device)
    rows, dR, shift = inputs[3], inputs[5], inputs[6]
    sample, train_step = step_calls(lora, inputs, torch.bfloat16)

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    paths = {}
    for path in ("plain", "compiled"):
        if path == "compiled":
            results["compile_s"] = {"sampling_graphs": first_call_s(sample)}
            v_on = sample()
            results["compile_s"]["training_graphs"] = first_call_s(lambda: train_step(v_on[rows]))
        v = sample()
        on_policy, _ = train_step(v[rows])
        off_policy, grads = train_step(v[rows] + shift)
        paths[path] = (v, off_policy, grads)
        results[path] = {"ms_sampling_batch_12": timed_ms(sample),
                         "ms_training_micro_batch_6": timed_ms(lambda: train_step(v[rows])),
                         "ratio_minus_one_on_policy_max": (on_policy.ratio - 1).abs().max().item()}
        if path == "plain":
            compile_blocks(list(transformer.transformer_blocks))
    (v0, t0, g0), (v1, t1, g1) = paths["plain"], paths["compiled"]
    results["compiled_vs_plain"] = {
        "velocity_max_abs_difference_over_max_abs": ((v1 - v0).abs().max() / v0.abs().max()).item(),
        "loss_difference_over_mean_abs_dR": ((t1.loss - t0.loss).abs() / dR.abs().mean()).item(),
        "ratio_max_abs_difference": (t1.ratio - t0.ratio).abs().max().item(),
        "lora_gradient_relative_norm_difference": ((g1 - g0).norm() / g0.norm()).item(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
