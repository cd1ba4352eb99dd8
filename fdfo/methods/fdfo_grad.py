"""The FDFO paper's gradient ablations (arXiv 2603.12893, Fig. 8): FDFO's churned pairs, target and surrogate,
with the exact reward gradient in place of the finite-difference direction — ∇R at the final latent for every
step (row I), or carried back through the sampling chain to each step's output (row J: DRaFT with K = all steps,
applied through FDFO's target); optionally weighted over time by Reward Score Matching's η(σ) (Lee et al., 2026,
its `sd35_first_order`). Formulas: fdfo/formulas/gradient.py; the rest is FDFO's (fdfo/methods/fdfo.py)."""

from __future__ import annotations

from functools import partial

import torch

from fdfo.config import ConfigError, FdfoGradConfig, TrainConfig, TrainPhaseConfig
from fdfo.formulas.churn import raw_gammas
from fdfo.formulas.estimator import endpoint_differences
from fdfo.formulas.gradient import rms, time_weight, virtual_pair
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems, split_items
from fdfo.methods.base import Epoch, EpochScores
from fdfo.methods.fdfo import Fdfo, PairConditioning, surrogate_terms
from fdfo.model.sampler import Trajectories, churned_euler_step
from fdfo.model.backbone import PromptEmbeds
from fdfo.rewards.registry import check_differentiable, reward_terms


class FdfoGrad(Fdfo):
    settings = (*Fdfo.settings, "grad")

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.grad: FdfoGradConfig = cfg.grad
        self.terms = reward_terms(cfg.reward_preset, cfg.reward)

    def check(self) -> None:
        check_differentiable(self.terms, "fdfo_grad")
        if self.grad.chain and self.sample.churn_schedule != "raw":
            raise ConfigError(f"--grad.chain differentiates the churned steps with the raw schedule's γ, and "
                              f"--sample.churn-schedule {self.sample.churn_schedule} draws γ per pair: use the raw "
                              "schedule with --grad.chain, or row I (without --grad.chain) with any schedule.")

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """This rank's pairs, scored; each image's reward gradient (row I), carried back to every step (row J); an
        item per (sample, timestep) with its input, sampled velocity, and the signal (d, dR) of a virtual pair
        displaced along that gradient by the size of the real pair's displacement."""
        sampled, prompts = self.sample_pairs(learner, epoch)
        trajs, T, per_call = sampled.batches, self.sample.num_solver_steps, epoch.plan.sampling_batch
        with epoch.timer("gradient"):
            learner.reward_models.to_device()
            directions = torch.cat([self.directions(learner, traj, sampled.cond.take(torch.arange(k * per_call, (k + 1) * per_call)),
                                                    [p for p in prompts[k * per_call:(k + 1) * per_call] for _ in range(2)],
                                                    epoch.plan.micro_batch)
                                    for k, traj in enumerate(trajs)])  # (2P, T, C, h, w)
            learner.reward_models.park()
            size = rms(endpoint_differences(torch.cat([t.final_latents for t in trajs])))  # the real pairs' |dx|
            d, dR = virtual_pair(directions.flatten(0, 1), size.repeat_interleave(T))
            dR = dR * time_weight(trajs[0].sigmas[:-1], self.grad.time_weight).repeat(len(size))
            at = PairConditioning(sampled.cond.gather(), trajs[0].sigmas, self.sample.guidance_scale)
            rows = [torch.cat([t.inputs for t in trajs]).flatten(0, 1), torch.cat([t.velocities for t in trajs]).flatten(0, 1),
                    d, dR]  # item = sample · T + t
            items = TrainingItems.shuffled(rows, self.seed, epoch.index, epoch.plan.world_size,
                                           partial(micro_batch_loss, learner, at=at, train=self.train))
        return self.scores(sampled, prompts), items

    def directions(self, learner: Learner, traj: Trajectories, cond: PromptEmbeds, prompts: list[str],
                   chunk: int) -> torch.Tensor:
        """Each sample's reward gradient for each step t, (2P, T, C, h, w): ∂R/∂x_T for every t (row I), or
        ∂R/∂x_{t+1}, the gradient w.r.t. the output of step t through the later steps of the sampling chain (row J,
        under the sampling's LoRA and churn coefficients, the churn noise held fixed), `chunk` samples at a time."""
        gradient = reward_gradient(learner, traj.final_latents, prompts, cond.embeds.dtype)
        T = traj.inputs.shape[1]
        if not self.grad.chain:
            return gradient[:, None].expand(-1, T, *gradient.shape[1:])
        cond = cond.repeat_interleave(2)
        return torch.cat([self.carried_back(learner, traj, cond.index(slice(i, i + chunk)), gradient[i:i + chunk],
                                            slice(i, i + chunk)) for i in range(0, len(gradient), chunk)])

    def carried_back(self, learner: Learner, traj: Trajectories, cond: PromptEmbeds, gradient: torch.Tensor,
                     rows: slice) -> torch.Tensor:
        """∂R/∂x_{t+1} for t = 0 … T−1 from ∂R/∂x_T, one vector-Jacobian product of a sampling step at a time:
        ∂R/∂x_t = (∂x_{t+1}/∂x_t)ᵀ ∂R/∂x_{t+1}. Each product takes the adjoint at unit rms (it is linear), so that
        an fp16 backward pass neither underflows nor overflows."""
        T, sigmas = traj.inputs.shape[1], traj.sigmas
        gammas = raw_gammas(T, self.sample.churn_weight)
        adjoint, out = gradient, [gradient]
        for t in range(T - 1, 0, -1):
            x = traj.inputs[rows, t].detach().requires_grad_(True)
            size = rms(adjoint).clamp_min(torch.finfo(torch.float32).tiny).view(-1, *[1] * (adjoint.dim() - 1))
            with torch.enable_grad():
                v = learner.backbone.velocity(learner.backbone.transformer, x, sigmas[t], cond, self.sample.guidance_scale)
                fixed_noise = torch.zeros_like(x) if gammas[t + 1] > 0 else None
                step = churned_euler_step(x, v.float(), sigmas[t], sigmas[t + 1], gammas[t + 1], fixed_noise)
                adjoint = torch.autograd.grad(step, x, grad_outputs=adjoint / size)[0] * size
            out.append(adjoint)
        return torch.stack(out[::-1], dim=1)


def reward_gradient(learner: Learner, latents: torch.Tensor, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
    """∂R/∂x_T of each final latent, through the decoder and the reward, one image at a time (the decoder's
    activations with gradient are large at 512 px). In fp16 the reward is scaled before its backward pass, as a
    loss scaler does (halved until the gradient is finite), so that the decoder's gradients do not underflow."""
    gradients = []
    for i in range(len(latents)):
        x = latents[i:i + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            reward = learner.reward(learner.backbone.decode(x, dtype), prompts[i:i + 1], differentiable=True).total.sum()
        scale = 2.0 ** 16 if dtype == torch.float16 else 1.0
        while True:
            gradient = torch.autograd.grad(reward * scale, x, retain_graph=scale > 1)[0]
            if scale <= 1 or torch.isfinite(gradient).all():
                break
            scale /= 2
        gradients.append(gradient / scale)
    return torch.cat(gradients)


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, at: PairConditioning,
                     train: TrainPhaseConfig) -> dict[str, torch.Tensor]:
    """FDFO's surrogate, each item with its own (d, dR)."""
    x, v_ref, d, dR = rows
    sample, t = split_items(items, len(at.sigmas) - 1)
    return surrogate_terms(learner, x, v_ref, d, dR, sample, t, at, train)
