"""What parking the frozen models costs on a GPU: the host copy made once, and the trip back every epoch.

python bench/parking.py --out bench/results/parking.json

Builds what `--memory-efficient` parks at their real shapes with random weights (SD3.5-M's three text
encoders; PickScore and the Qwen2.5-VL-7B reward) and times, for all of them together: making the host copy
as `Parking` does (one pinned buffer for all tensors, filled from the GPU), with one pinned buffer per tensor,
and into pageable memory; and bringing the weights back to the GPU from pinned and from pageable memory.
Parking itself drops the GPU copy and costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.numerics import first_call_s  # noqa: E402
from fdfo.model.parking import Parking  # noqa: E402
from fdfo.rewards import PRESETS, Scorers, build_reward  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    pipe = random_pipeline("sd35m", device=device, dtype=torch.bfloat16)
    reward = build_reward(PRESETS["combined"], Scorers(device, twins="full", purpose="reward"))
    modules = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, *reward.local_models()]
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    gib = sum(t.numel() * t.element_size() for t in tensors) / 2**30

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gib": gib}
    parking = None

    def make():
        nonlocal parking
        parking = Parking(modules, device)
    results["host_copy_pinned_s"] = first_call_s(make)
    parking.park()
    results["to_gpu_from_pinned_s"] = first_call_s(parking.to_device)
    results["park_s"] = first_call_s(parking.park)
    parking.to_device()
    del parking  # free its host memory before the next copies

    def pinned_per_tensor():
        return [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in tensors]
    results["host_copy_pinned_per_tensor_s"] = first_call_s(pinned_per_tensor)
    pageable = []
    results["host_copy_pageable_s"] = first_call_s(lambda: pageable.extend(t.detach().cpu() for t in tensors))
    results["to_gpu_from_pageable_s"] = first_call_s(lambda: [h.to(device) for h in pageable])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
