"""FDFO, the paper's method (McAllister et al., arXiv 2603.12893): pairs of churned ODE trajectories, finite
differences of their rewards, and the SPO-style surrogate on every (sample, timestep) item (§2–§4).
Its formulas: fdfo/formulas/estimator.py and fdfo/formulas/churn.py."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from fdfo import distributed
from fdfo.config import SampleConfig, TrainConfig, TrainPhaseConfig
from fdfo.formulas.churn import interval_gammas, prior_gammas
from fdfo.formulas.estimator import endpoint_differences, normalise, reward_differences, surrogate_loss
from fdfo.harness.learner import Learner
from fdfo.harness.optimise import TrainingItems, split_items
from fdfo.harness.rollouts import Sampled, SamplingCall, sample_and_score
from fdfo.harness.seeding import pair_generator
from fdfo.methods.base import Epoch, EpochScores, Method
from fdfo.model.sampler import ChurnDraw, sample_pairs
from fdfo.model.backbone import PromptEmbeds


@dataclass
class PairConditioning:
    """What every rank needs to evaluate v_θ on any item: the prompt of its pair and its noise level."""

    cond: PromptEmbeds  # prompt embeddings per pair (N rows)
    sigmas: torch.Tensor  # (T + 1,)
    guidance_scale: float  # of the sampling, which training reproduces


@dataclass
class SharedSignal(PairConditioning):
    """... and of every sample, §3's d and dR."""

    d: torch.Tensor  # normalised endpoint differences, (2N, C, h, w)
    dR: torch.Tensor  # reward differences, (2N,)


class Fdfo(Method):
    settings = ("sample.churn_schedule", "sample.churn_weight", "sample.interval", "sample.prior", "train.clip_range",
                "train.kl_weight")

    def __init__(self, cfg: TrainConfig):
        self.sample, self.train, self.seed = cfg.sample, cfg.train, cfg.seed

    @property
    def items_per_sample(self) -> int:
        return self.sample.num_solver_steps  # every step of every trajectory

    def epoch(self, learner: Learner, epoch: Epoch) -> tuple[EpochScores, TrainingItems]:
        """This rank's pairs, scored; every (sample, timestep) item with its input x_t and sampled velocity v_ref,
        and §4's surrogate loss."""
        sampled, prompts = self.sample_pairs(learner, epoch)
        trajs = sampled.batches
        inputs = torch.cat([t.inputs for t in trajs]).flatten(0, 1)  # item = sample · T + t
        velocities = torch.cat([t.velocities for t in trajs]).flatten(0, 1)
        final_latents = torch.cat([t.final_latents for t in trajs])

        # Turn rewards into finite-difference targets and share them with every rank (§3).
        with epoch.timer("share"):
            signal = share_signal(final_latents, sampled.scores.total, sampled.cond, trajs[0].sigmas,
                                  self.sample.guidance_scale)
            items = TrainingItems.shuffled([inputs, velocities], self.seed, epoch.index, epoch.plan.world_size,
                                           partial(micro_batch_loss, learner, signal=signal, train=self.train))
        return self.scores(sampled, prompts), items

    def sample_pairs(self, learner: Learner, epoch: Epoch) -> tuple[Sampled, list[str]]:
        """This rank's pairs (global pairs rank·P … rank·P + P − 1, each from its own seeded noise), scored, and
        their prompts."""
        plan, sample, device = epoch.plan, self.sample, learner.backbone.transformer.device
        first_pair = distributed.rank() * plan.pairs_per_rank
        pairs = range(first_pair, first_pair + plan.pairs_per_rank)
        prompts = epoch.stream.prompts_for(epoch.index, pairs)
        batches = [range(b, b + plan.sampling_batch) for b in range(0, plan.pairs_per_rank, plan.sampling_batch)]
        calls = [SamplingCall(torch.tensor(rows), [pair_generator(self.seed, epoch.index, pairs[i], device) for i in rows],
                              [prompts[i] for i in rows for _ in range(2)]) for rows in batches]
        sampler = partial(sample_pairs, num_steps=sample.num_solver_steps, churn=churn_draw(sample),
                          guidance_scale=sample.guidance_scale, resolution=sample.resolution)
        return sample_and_score(learner, prompts, calls, sampler, sample, plan.sampling_batch, epoch.timer,
                                f"epoch {epoch.index} sampling"), prompts

    @staticmethod
    def scores(sampled: Sampled, prompts: list[str]) -> EpochScores:
        return EpochScores(sampled.scores.total, sampled.scores.terms, [p for p in prompts for _ in range(2)],
                           sampled.first_images)


def churn_draw(sample: SampleConfig) -> float | ChurnDraw:
    """The sampler's churn: the raw schedule's γ, or the interval or prior schedule drawn per pair from the
    pair's own generator (two, or one, standard normal numbers before its noise)."""
    if sample.churn_schedule == "raw":
        return sample.churn_weight

    def levels(sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas[:-1] * 1000 / 1000  # as published: the scheduler's timesteps / 1000, σ_0 … σ_{T−1}

    def normals(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, generator=generator, device=generator.device)
    i, p = sample.interval, sample.prior
    if sample.churn_schedule == "interval":
        return lambda sigmas, g: interval_gammas(levels(sigmas), normals(2, g), i.mu, i.sigma, i.churn_weight,
                                                 i.churn_weight_sigma, i.soft_sigma)
    return lambda sigmas, g: prior_gammas(levels(sigmas), normals(1, g), p.churn_weight, p.churn_weight_sigma)


def share_signal(final_latents: torch.Tensor, rewards: torch.Tensor, cond: PromptEmbeds, sigmas: torch.Tensor,
                 guidance_scale: float) -> SharedSignal:
    """d and dR of every sample of every rank, and every pair's prompt embeddings (small next to the trajectories)."""
    d = normalise(endpoint_differences(final_latents))
    dR = reward_differences(rewards)
    return SharedSignal(d=distributed.all_gather_tensor(d), dR=distributed.all_gather_tensor(dR), cond=cond.gather(),
                        sigmas=sigmas, guidance_scale=guidance_scale)


def micro_batch_loss(learner: Learner, rows: list[torch.Tensor], items: torch.Tensor, signal: SharedSignal,
                     train: TrainPhaseConfig) -> dict[str, torch.Tensor]:
    """The surrogate loss of a micro-batch of items, v_θ computed exactly as during sampling."""
    x, v_ref = rows
    sample, t = split_items(items, len(signal.sigmas) - 1)
    return surrogate_terms(learner, x, v_ref, signal.d[sample], signal.dR[sample], sample, t, signal, train)


def surrogate_terms(learner: Learner, x: torch.Tensor, v_ref: torch.Tensor, d: torch.Tensor, dR: torch.Tensor,
                    sample: torch.Tensor, t: torch.Tensor, at: PairConditioning, train: TrainPhaseConfig
                    ) -> dict[str, torch.Tensor]:
    """§4's surrogate of items (sample, t) with inputs x, sampled velocities v_ref and signal (d, dR)."""
    sigma, cond = at.sigmas[t], at.cond.take(torch.div(sample, 2, rounding_mode="floor"))
    v_theta = learner.backbone.velocity(learner.model, x, sigma, cond, at.guidance_scale)
    v_base = learner.reference_velocity(x, sigma, cond, at.guidance_scale) if train.kl_weight > 0 else None
    terms = surrogate_loss(v_theta, v_ref, d, dR, train.clip_range, train.kl_weight, v_base)
    return {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl, "clipfrac": terms.clipfrac,
            "ratio_dev": (terms.ratio - 1).abs().mean()}
