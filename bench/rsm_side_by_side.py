"""Reward Score Matching's formulas (fdfo/formulas/rsm.py) against the published code's, executed side by side on
the same random tensors, and its SD3.5-M recipe against ours.

    pip install ml_collections   # the published configs need it
    python bench/rsm_side_by_side.py --published PATH [--out bench/results/rsm-side-by-side.json]

PATH is a checkout of github.com/jaylee2000/rsm (never committed here). What runs of it, unchanged:
sd35_zeroth_order/flow_grpo/sd3_train_shared.py (the matching weight), flow_grpo/stat_tracking.py (advantages),
flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (the branch step), and from scripts/train_sd3_pr.py — too heavy
to import (h5py, wandb, a flag registry) — the source of `compute_noise_pred_rows`, of the schedule helpers and
of the loss statements inside `main`, cut out by their first and last lines and executed on our tensors.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from numbers import Integral
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fdfo.config import TrainConfig  # noqa: E402
from fdfo.formulas.flow_grpo import diffusion_coefficient, group_advantages, sde_step  # noqa: E402
from fdfo.formulas.rsm import hinge_matching_loss, matching_weight, mean_active_branches, step_kl  # noqa: E402
from fdfo.model.sd3 import SD3  # noqa: E402
from fdfo.model.tiny import random_pipeline, sd3_scheduler  # noqa: E402


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(path.read_text(), node)


def statements(path: Path, first: str, last: str, after: str = "") -> str:
    """The lines of `path` from the one starting with `first` to the one starting with `last`, dedented; with
    `after`, the first such block after the line starting with it."""
    lines = path.read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if line.strip().startswith(after)) if after else 0
    start = next(i for i in range(begin, len(lines)) if lines[i].strip().startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(lines[start:end + 1]))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A micro-batch's mean over its rows with a signal, as the published loss takes it (ours: per optimiser
    step, fdfo/methods/rsm.py per_step_mean; the same for one micro-batch)."""
    return (values * mask.float()).sum() / mask.float().sum().clamp(min=1.0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.published / "sd35_zeroth_order"
    script = root / "scripts" / "train_sd3_pr.py"
    sys.path.insert(0, str(root))
    shared = load("rsm_shared", root / "flow_grpo" / "sd3_train_shared.py")
    stat_tracking = load("rsm_stat_tracking", root / "flow_grpo" / "stat_tracking.py")
    sde = load("rsm_sde", root / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py")
    helpers: dict = {"torch": torch, "Integral": Integral}
    for name in ("normalize_exploration_schedule", "compute_exploration_k_avg_for_active_steps",
                 "compute_noise_pred_rows"):
        exec(function_source(script, name), helpers)
    results: dict = {}

    # The recipe: the published config `sd3.lowsnr2.branch.geneval.matching.fairclip2` against ours.
    cwd = Path.cwd()
    os.chdir(root)  # its config reads paths from the working folder
    try:
        config = load("rsm_sd3_matrix", root / "config" / "sd3_matrix.py").get_config(
            "sd3.lowsnr2.branch.geneval.matching.fairclip2")
    finally:
        os.chdir(cwd)
    from fdfo.cli import parse_train_config
    ours: TrainConfig = parse_train_config(["--method", "rsm"])
    steps = int(config.sample.num_steps)
    schedule = helpers["normalize_exploration_schedule"](list(config.sample.exploration_k), steps)
    recipe = {
        "branches": (schedule, list(ours.rsm.branches)),
        "k_mean": (helpers["compute_exploration_k_avg_for_active_steps"](schedule), mean_active_branches(ours.rsm.branches)),
        "num_steps": (steps, ours.sample.num_solver_steps),
        "guidance_scale": (config.sample.guidance_scale, ours.sample.guidance_scale),
        "seeds_per_prompt": (config.sample.num_image_per_prompt, ours.rsm.seeds_per_prompt),
        "noise_level": (config.sample.noise_level, ours.rsm.noise_level),
        "clip_range": (config.train.clip_range, ours.rsm.clip_range),
        "adv_clip_max": (config.train.adv_clip_max, ours.rsm.adv_clip_max),
        "kl_weight": (config.train.beta, ours.rsm.kl_weight),
        "learning_rate": (config.train.learning_rate, ours.train.learning_rate),
        "weight_decay": (config.train.adam_weight_decay, ours.train.weight_decay),
        "adam_betas": ((config.train.adam_beta1, config.train.adam_beta2), (ours.train.adam_beta1, ours.train.adam_beta2)),
        "adam_eps": (config.train.adam_epsilon, ours.train.adam_eps),
        "max_grad_norm": (config.train.max_grad_norm, ours.train.max_grad_norm),
        "resolution": (config.resolution, ours.sample.resolution or 512),
        "reward_evaluations_per_epoch": (config.sample.num_prompt_per_epoch * config.sample.num_image_per_prompt
                                         * sum(schedule), 2 * ours.total_pairs_per_epoch),
        "optimizer_steps_per_epoch": (config.train.updates_per_epoch, ours.gradient_steps_per_epoch),
        "lora_rank_alpha": ("32, 64 (train_sd3_pr.py)", f"{ours.lora_rank}, {ours.lora_alpha}"),
    }
    print("recipe (published, ours):")
    for key, (theirs, mine) in recipe.items():
        print(f"  {key:30s} {theirs!s:34s} {mine}")
    results["recipe"] = {k: {"published": v[0], "ours": v[1]} for k, v in recipe.items()}

    # The branch step and the weights on SD3's 10-step grid, at every branching step.
    scheduler = sd3_scheduler()
    scheduler.set_timesteps(steps)
    sigmas = SD3(random_pipeline("tiny")).sigmas(steps, None, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    shape = (12, 16, 8, 8)
    worst = {"sde_mean": 0.0, "sde_next": 0.0, "weight": 0.0, "policy_rows": 0.0, "policy_loss": 0.0, "kl_rows": 0.0,
             "kl_sde_loss": 0.0, "kl_anchor_loss": 0.0, "advantages": 0.0}
    k_mean, stopped = mean_active_branches(ours.rsm.branches), []
    for trial in range(50):
        step = torch.randint(0, 4, (shape[0],), generator=g)
        x, v_old, noise = (torch.randn(shape, generator=g) for _ in range(3))
        v_theta = v_old + 0.05 * torch.randn(shape, generator=g)
        v_ref = v_old + 0.05 * torch.randn(shape, generator=g)
        timestep = scheduler.timesteps[step]
        # The SDE step with the same noise (theirs draws it: its mean and std, with our ε).
        _, _, mean_p, std_p = sde.sde_step_with_logprob(scheduler, v_old, timestep, x, noise_level=0.7)
        ours_step = sde_step(x, v_old, sigmas[step], sigmas[step + 1], 0.7, noise, sigma_max=sigmas[1].item())
        worst["sde_mean"] = max(worst["sde_mean"], relative(ours_step.mean, mean_p))
        worst["sde_next"] = max(worst["sde_next"], relative(ours_step.next, mean_p + std_p * noise))
        # The loss statements of `main`, on these rows.
        rewards = torch.randn(shape[0], generator=g)
        rewards[:3] = 0.5  # a group whose rewards are equal: A = 0, masked
        groups = [f"seed{int(s) % 3}|t={float(t)}" for s, t in zip(step, timestep)]
        groups[:3] = ["flat|t=1"] * 3
        tracker = stat_tracking.PerPromptStatTracker(global_std=False)
        adv_published = torch.as_tensor(tracker.update(np.array(groups), rewards.numpy().astype(np.float64)),
                                        dtype=torch.float32)
        index = torch.tensor([sorted(set(groups)).index(k) for k in groups])
        adv_ours = group_advantages(rewards, index, global_std=False)
        worst["advantages"] = max(worst["advantages"], (adv_ours - adv_published).abs().max().item())
        prompt_embeds = torch.zeros(shape[0], 1, 1)
        published_transformer = lambda v: (lambda **kw: (torch.cat([v, v]) if kw["hidden_states"].shape[0] == 2 * shape[0] else v,))  # noqa: E731
        cfg = SimpleNamespace(train=SimpleNamespace(cfg=False, reweight_type="fair_clip2", clip_range=ours.rsm.clip_range,
                                                    adv_clip_max=5.0, beta=ours.rsm.kl_weight, heuristic_kldenom_trick=False),
                              sample=SimpleNamespace(noise_level=0.7, guidance_scale=1.0))
        pipeline = SimpleNamespace(scheduler=scheduler)
        sample = {"latents": x, "timesteps": timestep, "next_timesteps": scheduler.timesteps.tolist() + [0.0],
                  "noise_preds": v_old, "noises": noise, "advantages": adv_published,
                  "row_mask": (adv_published.abs() != 0).float(),
                  "exploration_k": torch.tensor(ours.rsm.branches)[step]}
        sample["next_timesteps"] = torch.tensor(sample["next_timesteps"])[step + 1]
        prev_mean, tilde_t, noise_pred = helpers["compute_noise_pred_rows"](published_transformer(v_theta), pipeline,
                                                                            sample, prompt_embeds, None, cfg)
        prev_mean_ref = helpers["compute_noise_pred_rows"](published_transformer(v_ref), pipeline, sample,
                                                           prompt_embeds, None, cfg)[0]
        namespace = {"torch": torch, "config": cfg, "sample": sample, "noise_pred": noise_pred,
                     "prev_sample_mean": prev_mean, "prev_sample_mean_ref": prev_mean_ref, "tilde_sigma_t": tilde_t,
                     "timestep": timestep, "delta_t": (timestep - sample["next_timesteps"]) / 1000.0,
                     "exploration_k_avg_for_loss": k_mean,
                     "compute_matching_weight_by_reweight": shared.compute_matching_weight_by_reweight,
                     "combine_matching_terms_by_reweight": shared.combine_matching_terms_by_reweight}
        exec(statements(script, "advantages = torch.clamp(", "kl_sde_loss = (kl_per_row * row_mask).sum() / valid_count",
                        after="prev_sample_mean, tilde_sigma_t, noise_pred = compute_noise_pred_rows("), namespace)
        sigma, dt = sigmas[step], sigmas[step] - sigmas[step + 1]
        tilde = diffusion_coefficient(sigma, 0.7, sigmas[1].item())
        weight = k_mean / torch.tensor(ours.rsm.branches, dtype=torch.float32)[step]
        mask = adv_ours.clamp(-5, 5) != 0
        rows = hinge_matching_loss(v_theta, v_old, noise, adv_ours.clamp(-5, 5), sigma, dt, tilde,
                                   ours.rsm.clip_range) * weight
        worst["weight"] = max(worst["weight"], relative(matching_weight(sigma, dt, tilde), namespace["weight"].flatten()))
        worst["policy_rows"] = max(worst["policy_rows"], relative(rows, namespace["policy_per_row"]))
        stopped += [(rows[mask] == 0).float().mean().item()]  # rows the hinge stops: both of its branches ran
        worst["policy_loss"] = max(worst["policy_loss"], relative(masked_mean(rows, mask), namespace["policy_loss"]))
        mean_theta = sde_step(x, v_theta, sigma, sigmas[step + 1], 0.7, 0 * x, sigma_max=sigmas[1].item()).mean
        mean_ref = sde_step(x, v_ref, sigma, sigmas[step + 1], 0.7, 0 * x, sigma_max=sigmas[1].item()).mean
        kl_rows = step_kl(mean_theta, mean_ref, tilde, dt) * weight
        worst["kl_rows"] = max(worst["kl_rows"], relative(kl_rows, namespace["kl_per_row"]))
        worst["kl_sde_loss"] = max(worst["kl_sde_loss"], relative(masked_mean(kl_rows, mask), namespace["kl_sde_loss"]))
        # The anchors' KL: the statements after the anchors' model calls.
        anchor = {"kl_anchor_sample": {"timesteps": timestep, "next_timesteps": sample["next_timesteps"]},
                  "kl_prev_sample_mean": prev_mean, "kl_prev_sample_mean_ref": prev_mean_ref,
                  "kl_tilde_sigma_t": tilde_t, "config": cfg, "torch": torch, "exploration_k_avg_for_loss": k_mean}
        exec(statements(script, "kl_timestep = kl_anchor_sample", "kl_anchor_loss = kl_anchor_per_row.mean()"), anchor)
        ours_anchor = (k_mean * step_kl(mean_theta, mean_ref, tilde, dt)).mean()
        worst["kl_anchor_loss"] = max(worst["kl_anchor_loss"], relative(ours_anchor, anchor["kl_anchor_loss"]))
    print("formulas, 50 trials of 12 rows at random branching steps: max relative |ours − published|")
    for key, value in worst.items():
        print(f"  {key:16s} {value:.3g}")
    print(f"  (the hinge stopped {np.mean(stopped):.0%} of the rows with a signal)")
    results["formulas_max_relative_difference"] = worst
    results["hinge_stopped_fraction"] = float(np.mean(stopped))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
