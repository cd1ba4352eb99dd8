"""DiffusionNFT's rollouts, ours against the published solver, on the tiny SD3 with the same noise and the same
velocity field.

    python bench/nft_solver_side_by_side.py --published PATH [--out bench/results/nft-solver-side-by-side.json]

PATH is a checkout of NVlabs/DiffusionNFT (never committed here). Its flow_grpo/diffusers_patch/solver.py runs
unchanged: `run_sampling(v_pred_fn, z, sigmas, "dpm2", determistic=True)`, v_pred_fn as its pipeline builds it
(flow_grpo/diffusers_patch/pipeline_with_logprob.py: the transformer at `torch.full(..., sigma * 1000,
dtype=torch.long)`, no CFG as in its recipe), against our `sample_rollouts(..., solver="dpm2",
integer_timesteps=True)` from the same starting noise. Also: how far Euler (our rollouts before) ends from it, and
each of the two changes alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.model.sampler import sample_rollouts  # noqa: E402
from fdfo.model.sd3 import SD3  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("nft_solver", args.published / "flow_grpo" / "diffusers_patch" / "solver.py")
    theirs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(theirs)
    torch.manual_seed(0)
    pipe = SD3(random_pipeline("tiny"))
    cond = pipe.encode(["a cat", "a dog on the moon", "", "a red cube"], 1.0, 32)
    results = []
    for steps in (10, 40):
        sigmas = pipe.sigmas(steps, None, torch.device("cpu"))
        generators = [torch.Generator().manual_seed(100 + i) for i in range(4)]
        z = torch.stack([torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(100 + i)) for i in range(4)])

        def v_pred_fn(x, sigma):
            timesteps = torch.full([x.shape[0]], sigma * 1000, device=x.device, dtype=torch.long)
            return pipe.transformer(hidden_states=x, timestep=timesteps, encoder_hidden_states=cond.embeds,
                                    pooled_projections=cond.pooled, return_dict=False)[0]
        with torch.no_grad():
            published, _, _ = theirs.run_sampling(v_pred_fn, z, sigmas, "dpm2", determistic=True)
        ours = sample_rollouts(pipe, cond, generators, num_steps=steps, noise_level=0.0, resolution=64,
                               solver="dpm2", integer_timesteps=True).final_latents
        euler = sample_rollouts(pipe, cond, generators, num_steps=steps, noise_level=0.0, resolution=64).final_latents
        euler_integer = sample_rollouts(pipe, cond, generators, num_steps=steps, noise_level=0.0, resolution=64,
                                        integer_timesteps=True).final_latents
        dpm2_float = sample_rollouts(pipe, cond, generators, num_steps=steps, noise_level=0.0, resolution=64,
                                     solver="dpm2").final_latents
        gap = lambda a: ((a - published).norm() / published.norm()).item()  # noqa: E731
        row = {"steps": steps, "max_abs_difference": (ours - published).abs().max().item(),
               "bit_identical": torch.equal(ours, published), "relative_gap_of_euler": gap(euler),
               "relative_gap_of_euler_at_integer_timesteps": gap(euler_integer),
               "relative_gap_of_dpm2_at_float_timesteps": gap(dpm2_float)}
        results.append(row)
        print(row)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
