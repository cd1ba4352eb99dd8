"""How far a LoRA on the tiny model can move a reward: gradient ascent through the whole sampler (CPU).

python bench/demo_reach.py --reward brightness --steps 20

The sampler runs without churn and the reward is back-propagated through the VAE and all solver steps
into the LoRA, with AdamW; fresh prompts and noise every step. This is the best a reward-gradient
method could do, so it bounds what the finite-difference demo can reach in the same number of steps.
Prints the mean reward and its standard deviation over the batch's images every 5 steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.model.lora import attach_lora  # noqa: E402
from fdfo.harness.prompts import load_prompts  # noqa: E402
from fdfo.rewards import Scorers  # noqa: E402
from fdfo.model.sd3 import SD3  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--solver-steps", type=int, default=10)
    args = parser.parse_args()

    model = SD3(random_pipeline("tiny"))
    lora = attach_lora(model.transformer, seed=6)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=1e-4)
    score = Scorers(torch.device("cpu"), twins="tiny", purpose="reward").build(args.reward)
    prompts = load_prompts(Path("prompt_sets/demo.txt"))
    sigmas = model.sigmas(args.solver_steps, None, torch.device("cpu"))
    for step in range(args.steps):
        generator = torch.Generator().manual_seed(step)
        batch = [prompts[i] for i in torch.randint(len(prompts), (args.batch,), generator=generator)]
        cond = model.encode(batch, 1.0, 32)
        x = torch.randn(args.batch, *model.latent_shape(None), generator=generator)
        for i in range(args.solver_steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * model.velocity(model.transformer, x, sigmas[i], cond, 1.0)
        rewards = score(model.decode(x, torch.float32), batch)
        optimizer.zero_grad()
        (-rewards.mean()).backward()
        optimizer.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}: {args.reward} {rewards.mean().item():.4f} ± {rewards.std().item():.4f}", flush=True)


if __name__ == "__main__":
    main()
