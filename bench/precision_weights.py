"""The baselines' published precision against ours, on a GPU at SD3.5-M shapes: fp16 autocast over fp32 base
weights (Flow-GRPO's and DiffusionNFT's trainers move the transformer to the GPU in fp32 and its VAE too) against
fp16 autocast over bf16 base weights (ours, the FDFO recipe). The Hub's SD3.5-M weights are bf16, so the fp32
copy holds the same values: what differs is only where a bf16 parameter sets the dtype of an operation outside
autocast's casts (diffusers' RMSNorm casts its input to the weight's dtype, e.g. the q/k norms).

python bench/precision_weights.py --out bench/results/precision-weights-h200.json

Against fp32 without autocast: the velocities of a sampling batch of 12 (6 pairs) at σ = 0.6, the LoRA gradient of
a training micro-batch of 6 off the sampling policy, a VAE decode of 4 latents; milliseconds per call and the peak
memory, all eager (no compile, so that both weight dtypes run the same kernels' choice).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.numerics import sd35m_with_lora, step_calls, step_inputs, timed_ms  # noqa: E402
from fdfo.model.tiny import SD35M_VAE, default_dtype, vae  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    _, lora_bf16 = sd35m_with_lora(device)
    lora_fp32 = copy.deepcopy(lora_bf16).float()
    inputs = step_inputs(device)
    rows, shift = inputs[3], inputs[6]
    torch.manual_seed(1)
    with torch.device(device), default_dtype(torch.bfloat16):
        decoder_bf16 = vae(**SD35M_VAE)
    decoder_fp32 = copy.deepcopy(decoder_bf16).float()
    latents = torch.randn(4, 16, 64, 64, device=device)

    def run(lora, compute_dtype, decoder):
        sample, step = step_calls(lora, inputs, compute_dtype, 65536.0 if compute_dtype == torch.float16 else 1.0)

        def train_step(v_ref):
            return step(v_ref)[1]

        def decode():
            with torch.no_grad(), torch.autocast("cuda", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                return decoder.decode(latents.to(decoder.dtype), return_dict=False)[0].float()
        v = sample()
        torch.cuda.reset_peak_memory_stats()
        grads = train_step(v[rows] + shift)
        peak = torch.cuda.max_memory_allocated() / 2**30
        return {"v": v, "grads": grads, "images": decode(), "peak_training_gib": peak,
                "ms_sampling_batch_12": timed_ms(sample), "ms_training_micro_batch_6": timed_ms(lambda: train_step(v[rows])),
                "ms_decode_4": timed_ms(decode)}

    reference = run(lora_fp32, torch.float32, decoder_fp32)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "fp32_plain": {k: v for k, v in reference.items() if not isinstance(v, torch.Tensor)}}
    tensors = {}
    for name, lora, decoder in [("fp16_over_fp32_weights_published", lora_fp32, decoder_fp32),
                                ("fp16_over_bf16_weights_ours", lora_bf16, decoder_bf16)]:
        r = tensors[name] = run(lora, torch.float16, decoder)
        results[name] = {**{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)},
                         "velocity_relative_difference_vs_fp32": relative(r["v"], reference["v"]),
                         "lora_gradient_relative_difference_vs_fp32": relative(r["grads"], reference["grads"]),
                         "decoded_image_max_abs_difference_vs_fp32": (r["images"] - reference["images"]).abs().max().item()}
        print(name, results[name], flush=True)
    published, ours = tensors["fp16_over_fp32_weights_published"], tensors["fp16_over_bf16_weights_ours"]
    results["ours_vs_published"] = {"velocity_relative_difference": relative(ours["v"], published["v"]),
                                    "lora_gradient_relative_difference": relative(ours["grads"], published["grads"]),
                                    "decoded_image_max_abs_difference": (ours["images"] - published["images"]).abs().max().item()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
