"""train.py's body. The FDFO epoch: sample pairs → score → finite differences → shuffle across ranks → optimise →
report → save; with --method, a baseline's rollouts and items (fdfo/baselines.py) in its place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fdfo import distributed
from fdfo.baselines import BASELINES, Scored, check_groups
from fdfo.batching import BatchPlan, plan_batches
from fdfo.before_after import BEFORE_AFTER, write_before_after
from fdfo.config import SampleConfig, TrainConfig, TrainPhaseConfig, check_train_config, to_jsonable
from fdfo.estimator import endpoint_differences, normalise, reward_differences, surrogate_loss
from fdfo.learner import Learner, set_up
from fdfo.optimise import TrainingItems, optimise_epoch
from fdfo.plots import REWARD_CURVE
from fdfo.prompts import PromptStream, load_prompts
from fdfo.resume import plan_resume
from fdfo.rewards import RewardOutput
from fdfo.runlog import RunLog, announce, open_run_dir, report_stop
from fdfo.sampler import sample_pairs
from fdfo.sd3 import PromptEmbeds, predict_velocity
from fdfo.seeding import item_permutation, pair_generator
from fdfo.timing import PhaseTimer


@dataclass
class RankSamples:
    """One rank's scored pairs of an epoch. Items are (sample, timestep) couples, item = sample · T + t."""

    inputs: torch.Tensor  # x_t of every item: (2P·T, C, h, w)
    velocities: torch.Tensor  # v_ref of every item: (2P·T, C, h, w)
    sigmas: torch.Tensor  # (T + 1,)
    final_latents: torch.Tensor  # (2P, C, h, w)
    rewards: torch.Tensor  # (2P,)
    terms: dict[str, torch.Tensor]  # term → (2P,)
    cond: PromptEmbeds  # one row per pair
    guidance_scale: float  # of the sampling, which training reproduces
    prompts: list[str]  # one per pair
    first_images: torch.Tensor  # the first pair's two images, for W&B


@dataclass
class SharedSignal:
    """What every rank needs of every sample to train on any item: §3's d and dR, the prompt, the item order."""

    d: torch.Tensor  # normalised endpoint differences, (2N, C, h, w)
    dR: torch.Tensor  # reward differences, (2N,)
    cond: PromptEmbeds  # prompt embeddings per pair (N rows)
    order: torch.Tensor  # the epoch's shuffle of all items of all ranks: step k trains on its slice k


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) a training run; returns its run folder."""
    # Initialize: every setting, the prompts and the checkpoint are checked before anything loads or is written.
    check_train_config(cfg)
    device = distributed.init()
    plan = plan_batches(cfg.total_pairs_per_epoch, distributed.world_size(), cfg.gradient_steps_per_epoch,
                        cfg.max_batch_size, cfg.sample.batch_size, cfg.train.batch_size, cfg.items_per_sample,
                        cfg.train.micro_batch)
    check_groups(cfg, plan)
    stream = PromptStream(load_prompts(cfg.prompt_file), cfg.seed, plan.total_pairs)
    settings = to_jsonable(cfg)
    resume = plan_resume(cfg.resume_from, settings, plan.total_pairs) if cfg.resume_from else None
    announce(settings, plan, cfg.total_pairs_per_epoch, resume)
    if cfg.dry_run:
        return Path(cfg.runs_dir) / f"<next id>-{cfg.run_name or cfg.default_run_name}"

    # Set up the model, its LoRA, the reward and the optimiser (restored from the checkpoint on resume).
    learner = set_up(cfg, device, resume)
    run_dir = open_run_dir(settings, asdict(plan), cfg.runs_dir, cfg.run_name or cfg.default_run_name, resume)
    log = RunLog(run_dir, cfg.log_wandb, resume_epoch=learner.epochs_done if resume else None)

    # Main training loop.
    epochs_run = 0
    try:
        for epoch in range(learner.epochs_done, cfg.num_epochs):
            timer = PhaseTimer(device)

            if cfg.method == "fdfo":
                # Sample pairs and score them (paper §2, §6).
                samples = sample_and_score(learner, stream, cfg.sample, plan, epoch, timer)

                # Turn rewards into finite-difference targets and share them with every rank (§3).
                with timer("share"):
                    order = item_permutation(cfg.seed, epoch, plan.world_size * len(samples.inputs))
                    items = fdfo_items(learner, samples, share_signal(samples, order), cfg.train)
            else:  # a baseline's rollouts, rewards and training items (fdfo/baselines.py)
                samples, items = BASELINES[cfg.method](learner, stream, cfg, plan, epoch, timer)

            # Optimise the LoRA on (sample, timestep) items shuffled across ranks (§4).
            steps = optimise_epoch(learner, items, plan, timer)
            learner.epochs_done = epoch + 1

            # Report.
            record = epoch_record(epoch, samples, timer, plan.total_pairs, learner.forward_passes())
            log.write_epoch(record, [{"kind": "step", "epoch": epoch, **s} for s in steps],
                            (samples.first_images, samples.rewards[:2].tolist(), samples.prompts[0]))
            epochs_run += 1

            # Save checkpoint.
            if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.num_epochs:
                learner.save(run_dir, plan.total_pairs, settings)

        # Show what training did: the same prompts and seeds before and after.
        learner.text_encoders.to_device()
        learner.reward_models.to_device()
        write_before_after(learner.pipe, learner.lora, learner.reward, cfg.sample, cfg.num_epochs, run_dir / BEFORE_AFTER)
        distributed.print0(f"Wrote {run_dir / BEFORE_AFTER} and {run_dir / REWARD_CURVE}")
    except BaseException as stop:
        report_stop(run_dir, stop, new_folder=resume is None or resume.run_dir is None, epochs_run=epochs_run)
        raise
    finally:
        log.close()
    return run_dir


def sample_and_score(learner: Learner, stream: PromptStream, sample: SampleConfig, plan: BatchPlan, epoch: int,
                     timer: PhaseTimer) -> RankSamples:
    """This rank's pairs of the epoch: global pairs rank·P … rank·P + P − 1, each from its own seeded noise.

    Every batch's prompts are encoded first, so that the text encoders are parked before the reward models
    come back to the GPU and sampling starts; the reward models are parked again once the last batch is scored.
    """
    pipe, device = learner.pipe, learner.pipe.transformer.device
    first_pair = distributed.rank() * plan.pairs_per_rank
    pair_ids = [range(first_pair + b * plan.sampling_batch, first_pair + (b + 1) * plan.sampling_batch)
                for b in range(plan.sampling_calls)]
    prompts = [stream.prompts_for(epoch, ids) for ids in pair_ids]
    with timer("encode"):
        conds = learner.encode(prompts, sample)
    pipe.transformer.eval()
    trajs, scores = [], []
    for ids, batch, cond in tqdm(list(zip(pair_ids, prompts, conds)), desc=f"epoch {epoch} sampling",
                                 disable=not distributed.is_main(), leave=False):
        with timer("sample"):
            generators = [pair_generator(stream.seed, epoch, g, device) for g in ids]
            trajs.append(sample_pairs(pipe, cond, generators, sample.num_solver_steps, sample.churn_weight,
                                      sample.guidance_scale, sample.resolution))
        with timer("reward"):
            scores.append(learner.reward(trajs[-1].images, [p for p in batch for _ in range(2)]))
    learner.reward_models.park()
    cat, scored = torch.cat, RewardOutput.cat(scores)
    return RankSamples(
        inputs=cat([t.inputs for t in trajs]).flatten(0, 1), velocities=cat([t.velocities for t in trajs]).flatten(0, 1),
        sigmas=trajs[0].sigmas, final_latents=cat([t.final_latents for t in trajs]), rewards=scored.total,
        terms=scored.terms,
        cond=PromptEmbeds.cat(conds), guidance_scale=sample.guidance_scale,
        prompts=[p for batch in prompts for p in batch], first_images=trajs[0].images[:2].cpu(),
    )


def share_signal(samples: RankSamples, order: torch.Tensor) -> SharedSignal:
    """d and dR of every sample of every rank, and every pair's prompt embeddings (small next to the trajectories)."""
    d = normalise(endpoint_differences(samples.final_latents))
    dR = reward_differences(samples.rewards)
    return SharedSignal(d=distributed.all_gather_tensor(d), dR=distributed.all_gather_tensor(dR),
                        cond=samples.cond.gather(), order=order)


def fdfo_items(learner: Learner, samples: RankSamples, signal: SharedSignal, train: TrainPhaseConfig) -> TrainingItems:
    """Every (sample, timestep) item with its input x_t and sampled velocity v_ref, and §4's surrogate loss."""
    return TrainingItems(local=[samples.inputs, samples.velocities], order=signal.order,
                         loss=lambda rows, items: micro_batch_loss(learner, *rows, items, samples, signal, train))


def micro_batch_loss(learner: Learner, x: torch.Tensor, v_ref: torch.Tensor, items: torch.Tensor,
                     samples: RankSamples, signal: SharedSignal, train: TrainPhaseConfig) -> dict[str, torch.Tensor]:
    """The surrogate loss of a micro-batch of items, v_θ computed exactly as during sampling."""
    T = len(samples.sigmas) - 1
    sample, t = torch.div(items, T, rounding_mode="floor"), items % T
    cond = signal.cond.take(torch.div(sample, 2, rounding_mode="floor"))
    v_theta = predict_velocity(learner.model, x, samples.sigmas[t], cond, samples.guidance_scale)
    v_base = None
    if train.kl_weight > 0:
        with torch.no_grad(), learner.lora.disable_adapter():
            v_base = predict_velocity(learner.model, x, samples.sigmas[t], cond, samples.guidance_scale)
    terms = surrogate_loss(v_theta, v_ref, signal.d[sample], signal.dR[sample], train.clip_range, train.kl_weight, v_base)
    return {"loss": terms.loss, "policy_loss": terms.policy_loss, "kl": terms.kl, "clipfrac": terms.clipfrac,
            "ratio_dev": (terms.ratio - 1).abs().mean()}


def epoch_record(epoch: int, samples: RankSamples | Scored, timer: PhaseTimer, total_pairs: int, forward_passes: int) -> dict:
    """The epoch's log record: rewards of all ranks (mean and spread, per term too), the cost so far (reward
    evaluations and samples through the transformer), time and memory per phase."""
    seconds = timer.elapsed()
    rewards = distributed.all_gather_tensor(samples.rewards)
    terms = {k: distributed.all_gather_tensor(v) for k, v in samples.terms.items()}
    return {"kind": "epoch", "epoch": epoch, "reward_evaluations": 2 * total_pairs * (epoch + 1),
            "transformer_forwards": forward_passes,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            **{f"reward_{k}": v.mean().item() for k, v in terms.items()},
            **{f"reward_{k}_std": v.std().item() for k, v in terms.items()},
            **{f"time_{k}": v for k, v in timer.seconds.items()}, "time_epoch": seconds,
            "pairs_per_s": total_pairs / seconds, **{f"peak_vram_gib_{k}": v for k, v in timer.peak_gib.items()}}
