"""DRaFT (Clark, Vicol, Swersky, Fleet, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
ICLR 2024) in the harness: ODE samples, then the reward's gradient back-propagated through the decoder and the
last K sampling steps into the LoRA (DRaFT-K), or, with K = 1, through n fresh noisings of the final sample, each
denoised in one step (DRaFT-LV); optionally DRaFT+'s penalty on the kept steps' distance to the base model
(NeMo-Aligner). Two images per prompt, the prompt of their pair, so that an epoch costs FDFO's reward evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from fdfo import distributed
from fdfo.config import ConfigError, DraftConfig, TrainConfig
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems
from fdfo.harness.rollouts import SamplingCall, sample_and_score
from fdfo.harness.seeding import TRAINING_NOISE, image_generator
from fdfo.methods.base import Epoch, EpochScores, Method
from fdfo.model.sampler import sample_rollouts
from fdfo.model.backbone import PromptEmbeds
from fdfo.rewards.registry import check_differentiable, reward_terms


@dataclass
class DraftSignal:
    """What every rank needs to train on any image: its prompt (embedded and as text) and the noise levels."""

    cond: PromptEmbeds  # one row per pair of every rank
    prompts: list[str]  # one per pair of every rank
    sigmas: torch.Tensor  # (T + 1,)
    guidance_scale: float
    seed: int
    epoch: int


class Draft(Method):
    needs_gradients = True
    settings = ("draft",)

    def __init__(self, cfg: TrainConfig):
        self.sample, self.draft, self.seed = cfg.sample, cfg.draft, cfg.seed
        self.terms = reward_terms(cfg.reward_preset, cfg.reward)

    @property
    def items_per_sample(self) -> int:
        return 1  # the image: its loss is its reward

    def check(self) -> None:
        d, steps = self.draft, self.sample.num_solver_steps
        if not 1 <= d.k <= steps:
            raise ConfigError(f"--draft.k must be between 1 and the {steps} sampling steps; got {d.k}.")
        if d.lv_samples < 0 or (d.lv_samples and d.k != 1):
            raise ConfigError(f"--draft.lv-samples {d.lv_samples}: DRaFT-LV takes 1 or more noisings of the last step "
                              f"and needs --draft.k 1 (got {d.k}); 0 turns it off.")
        if not d.kl_weight >= 0:
            raise ConfigError(f"--draft.kl-weight must be 0 or more; got {d.kl_weight}.")
        if d.kl_weight and d.lv_samples:
            raise ConfigError("--draft.kl-weight is DRaFT+'s penalty on the kept sampling steps, and DRaFT-LV "
                              "(--draft.lv-samples) keeps none: use one of the two.")
        check_differentiable(self.terms, "draft")

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """This rank's images (global image i from its own noise, the prompt of pair i // 2), scored; an item per
        image: the input of its first kept step (DRaFT-K), or its final latent (DRaFT-LV)."""
        plan, sample, device = epoch.plan, self.sample, learner.backbone.transformer.device
        images, first_pair = 2 * plan.pairs_per_rank, distributed.rank() * plan.pairs_per_rank
        prompts = epoch.stream.prompts_for(epoch.index, range(first_pair, first_pair + plan.pairs_per_rank))
        calls = [SamplingCall(torch.arange(b, b + 2 * plan.sampling_batch) // 2,
                              [image_generator(self.seed, epoch.index, 2 * first_pair + i, device)
                               for i in range(b, b + 2 * plan.sampling_batch)],
                              [prompts[i // 2] for i in range(b, b + 2 * plan.sampling_batch)])
                 for b in range(0, images, 2 * plan.sampling_batch)]
        sampler = partial(sample_rollouts, num_steps=sample.num_solver_steps, noise_level=0.0,
                          guidance_scale=sample.guidance_scale, resolution=sample.resolution)
        sampled = sample_and_score(learner, prompts, calls, sampler, sample, plan.sampling_batch, epoch.timer,
                                   f"epoch {epoch.index} sampling")
        with epoch.timer("share"):
            T = sample.num_solver_steps
            start = (torch.cat([b.final_latents for b in sampled.batches]) if self.draft.lv_samples else
                     torch.cat([b.inputs[:, T - self.draft.k] for b in sampled.batches]))
            signal = DraftSignal(sampled.cond.gather(),
                                 epoch.stream.prompts_for(epoch.index, range(plan.total_pairs)),
                                 sampled.batches[0].sigmas, sample.guidance_scale, self.seed, epoch.index)
            items = TrainingItems.shuffled([start], self.seed, epoch.index, plan.world_size,
                                           partial(micro_batch_loss, learner, signal=signal, draft=self.draft))
        scores = EpochScores(sampled.scores.total, sampled.scores.terms, [p for p in prompts for _ in range(2)],
                             sampled.first_images)
        return scores, items


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: DraftSignal,
                     draft: DraftConfig) -> dict[str, torch.Tensor]:
    """−(mean reward) of the micro-batch's images, differentiated through the kept steps and the decoder
    (+ DRaFT+'s penalty). DRaFT-LV: the mean over `lv_samples` noisings of each final latent."""
    x, pair = rows[0], torch.div(items, 2, rounding_mode="floor")
    cond, prompts = signal.cond.take(pair), [signal.prompts[p] for p in pair.tolist()]
    T, sigmas = len(signal.sigmas) - 1, signal.sigmas
    guarded = partial(checkpoint, use_reentrant=False) if draft.checkpointing else (lambda f, *a: f(*a))

    def velocity(x_i: torch.Tensor, i: int, rows_cond: PromptEmbeds) -> torch.Tensor:
        return guarded(lambda z: learner.backbone.velocity(learner.model, z, sigmas[i], rows_cond, signal.guidance_scale), x_i)

    kl = torch.zeros((), device=x.device)
    if draft.lv_samples:  # x is the final latent: noised again to σ_{T−1}, denoised in one step, n times
        n, sigma = draft.lv_samples, sigmas[T - 1]
        noise = torch.stack([torch.randn((n, *x.shape[1:]), device=x.device, generator=image_generator(
            signal.seed, signal.epoch, i, x.device, TRAINING_NOISE)) for i in items.tolist()])  # (B, n, C, h, w)
        x_noisy = ((1 - sigma) * x[:, None] + sigma * noise).flatten(0, 1)
        cond, prompts = cond.repeat_interleave(n), [p for p in prompts for _ in range(n)]
        x = x_noisy - sigma * velocity(x_noisy, T - 1, cond)
    else:  # x is the input of step T − K: the last K Euler steps with gradient
        for i in range(T - draft.k, T):
            v = velocity(x, i, cond)
            if draft.kl_weight > 0:
                kl = kl + (v - learner.reference_velocity(x, sigmas[i], cond, signal.guidance_scale)).pow(2).mean()
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        kl = kl / draft.k
    dtype = cond.embeds.dtype
    images = torch.cat([guarded(lambda z: learner.backbone.decode(z, dtype), x[j:j + 1]) for j in range(len(x))])
    reward = learner.reward(images, prompts, differentiable=True).total
    return {"loss": -reward.mean() + draft.kl_weight * kl, "reward": reward.mean().detach(), "kl": kl.detach()}
