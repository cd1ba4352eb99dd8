"""The training precisions on a GPU at SD3.5-M shapes: how far from fp32, is ρ = 1 on the policy, how fast?

python bench/precision.py --out bench/results/precision.json

Random weights (`sd35m_transformer`), a LoRA with non-zero B, 512 px and 205 text tokens, compiled blocks
as in training. For `--precision fp16` (the published recipe: fp16 autocast over bf16 weights, with a
gradient scaler) and `bf16`: the velocities of a sampling batch of 12 (6 pairs), the surrogate
loss and LoRA gradient of a training micro-batch of 6 off the sampling policy, against fp32 without
compile; ρ − 1 when the training pass re-evaluates the sampling policy; whether the scaled fp16 gradients
stay finite at the scaler's initial scale; milliseconds per call (fp32: plain PyTorch, the reference pass).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.numerics import first_call_s, sd35m_with_lora, step_calls, step_inputs, timed_ms  # noqa: E402
from fdfo.model.compile import compile_blocks  # noqa: E402
from fdfo.model.loading import training_dtypes  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    base, lora_bf16 = sd35m_with_lora(device)

    inputs = step_inputs(device)
    rows, shift = inputs[3], inputs[6]

    # Reference: an fp32 copy of the same weights, plain PyTorch (timed too: the fp32 row).
    lora_fp32 = copy.deepcopy(lora_bf16).float()
    sample, train_step = step_calls(lora_fp32, inputs, torch.float32)
    v_ref32 = sample()
    ref_terms, ref_grads = train_step(v_ref32[rows] + shift)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "fp32_plain": {"ms_sampling_batch_12": timed_ms(sample),
                              "ms_training_micro_batch_6": timed_ms(lambda: train_step(v_ref32[rows]))}}
    del lora_fp32, sample, train_step

    compile_blocks(list(base.transformer_blocks))  # the bf16 weights serve both autocast precisions, as in training
    for precision in ("fp16", "bf16"):
        weights, compute = training_dtypes(precision, device)
        scale = 65536.0 if compute == torch.float16 else 1.0  # GradScaler's initial scale
        sample, train_step = step_calls(lora_bf16, inputs, compute, scale)
        compile_s = {"sampling_graphs": first_call_s(sample)}
        v = sample()
        compile_s["training_graphs"] = first_call_s(lambda: train_step(v[rows]))
        on_policy, _ = train_step(v[rows])
        off_policy, grads = train_step(v[rows] + shift)
        results[precision] = {
            "weights": str(weights), "autocast": str(compute), "compile_s": compile_s,
            "ms_sampling_batch_12": timed_ms(sample),
            "ms_training_micro_batch_6": timed_ms(lambda: train_step(v[rows])),
            "ratio_minus_one_on_policy_max": (on_policy.ratio - 1).abs().max().item(),
            "ratio_minus_one_on_policy_mean": (on_policy.ratio - 1).abs().mean().item(),
            "scaled_gradients_finite": bool(torch.isfinite(grads).all()),
            "vs_fp32_plain": {
                "velocity_max_abs_difference_over_max_abs": ((v - v_ref32).abs().max() / v_ref32.abs().max()).item(),
                "velocity_relative_norm_difference": ((v - v_ref32).norm() / v_ref32.norm()).item(),
                "ratio_max_abs_difference": (off_policy.ratio - ref_terms.ratio).abs().max().item(),
                "lora_gradient_relative_norm_difference": ((grads - ref_grads).norm() / ref_grads.norm()).item(),
            },
        }
        print(precision, json.dumps(results[precision]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
