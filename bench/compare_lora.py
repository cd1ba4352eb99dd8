"""LoRA weights of two runs side by side, or a small sample of one run's to carry off a GPU machine.

python bench/compare_lora.py sample RUN_OR_CHECKPOINT OUT.safetensors   # every 8th weight of every tensor
python bench/compare_lora.py compare A B   # A, B: run folders, checkpoint folders or samples
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.runs.checkpoint import find_checkpoint  # noqa: E402

STRIDE = 8


def weights(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA's weights, flattened and thinned to every STRIDE-th (a sample file already is)."""
    if path.is_file():
        return load_file(path)
    state = load_file(find_checkpoint(path, "adapter_model.safetensors") / "adapter_model.safetensors")
    return {k: v.flatten()[::STRIDE].contiguous() for k, v in state.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["sample", "compare"])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    a = weights(args.a)
    if args.action == "sample":
        save_file(a, str(args.b))
        return
    b = weights(args.b)
    if a.keys() != b.keys():
        raise SystemExit(f"The two LoRAs have different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    lora_b = [k for k in a if "lora_B" in k]
    moved = max(a[k].abs().max().item() for k in lora_b)  # B starts at 0: how far training moved it
    print(json.dumps({"tensors": len(a), "weights_compared": sum(v.numel() for v in a.values()),
                      "max_abs_difference": diff, "max_abs_weight": scale, "max_abs_lora_B": moved}, indent=2))


if __name__ == "__main__":
    main()
