"""The FDFO training loop: sample pairs → score → finite differences → shuffle across ranks → optimise → report → save."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fdfo import distributed
from fdfo.batching import BatchPlan, plan_batches
from fdfo.before_after import BEFORE_AFTER, write_before_after
from fdfo.checkpoint import TrainingState, run_checkpoints, save_checkpoint
from fdfo.compile import compile_blocks, should_compile
from fdfo.config import TrainConfig, TrainPhaseConfig, check_train_config, to_jsonable
from fdfo.estimator import endpoint_differences, normalise, reward_differences, surrogate_loss
from fdfo.exchange import fetch_items, rank_slice, step_items
from fdfo.generation import to_uint8
from fdfo.lora import attach_lora, load_lora
from fdfo.models import REWARD_TWINS, load_pipeline, training_dtypes
from fdfo.offload import Parking
from fdfo.prompts import PromptStream, load_prompts
from fdfo.rewards import Reward, build_reward
from fdfo.plots import REWARD_CURVE
from fdfo.resume import Resume, plan_resume
from fdfo.runlog import RunLog, open_run_dir
from fdfo.sampler import sample_pairs
from fdfo.sd3 import PromptEmbeds, encode_prompts, predict_velocity
from fdfo.seeding import item_permutation, pair_generator


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
    prompts: list[str]  # one per pair
    first_images: torch.Tensor  # the first pair's two images, for W&B


@dataclass
class SharedSignal:
    """What every rank needs of every sample to train on any item: §3's d and dR, and the prompt."""

    d: torch.Tensor  # normalised endpoint differences, (2N, C, h, w)
    dR: torch.Tensor  # reward differences, (2N,)
    cond: PromptEmbeds  # prompt embeddings per pair (N rows); uncond rows: 1, shared by all


class PhaseTimer:
    """Wall time (and peak GPU memory on CUDA) accumulated per named phase."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_gib = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peak_gib[phase] = max(self.peak_gib.get(phase, 0.0), peak)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) a training run; returns its run folder."""
    # Initialize: every setting, the prompts and the checkpoint are checked before anything loads or is written.
    check_train_config(cfg)
    device = distributed.init()
    plan = plan_batches(cfg.total_pairs_per_epoch, distributed.world_size(), cfg.gradient_steps_per_epoch,
                        cfg.max_batch_size, cfg.sample.batch_size, cfg.train.batch_size, cfg.sample.num_solver_steps,
                        cfg.train.micro_batch)
    stream = PromptStream(load_prompts(cfg.prompt_file), cfg.seed, plan.total_pairs)
    settings = to_jsonable(cfg)
    resume = plan_resume(cfg.resume_from, settings, plan.total_pairs) if cfg.resume_from else None
    announce(settings, plan, cfg.total_pairs_per_epoch, resume)
    if cfg.dry_run:
        return Path(cfg.runs_dir) / f"<next id>-{cfg.run_name or cfg.default_run_name}"

    # Set up the model, its LoRA, the reward and the optimiser.
    weights_dtype, compute_dtype = training_dtypes(cfg.precision, device)
    pipe = load_pipeline(cfg.pretrained_model, device, weights_dtype)
    pipe.vae.enable_slicing()  # decode one image at a time, as the published sampler: the decoder's peak memory / 12
    lora = attach_lora(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    if should_compile(cfg.compile, device):
        compile_blocks(pipe.transformer)  # compiled on first use: in the first sampling batch and micro-batch
    reward = build_reward(cfg.reward_preset, device, twins=REWARD_TWINS.get(cfg.pretrained_model),
                          vlm_model_name=cfg.vlm_model_name, shard_vlm=cfg.vlm_use_fsdp, vlm_buffers=cfg.vlm_buffers)
    # With --memory-efficient the text encoders leave the GPU once the epoch's prompts are encoded, and the
    # reward models while the LoRA trains (they are frozen: leaving costs nothing, coming back one copy).
    frozen = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], reward.local_models()
    text_encoders, reward_models = (Parking(modules if cfg.memory_efficient else [], device) for modules in frozen)
    optimizer = make_optimizer(lora, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)  # fp16: loss scaling
    start_epoch, optimizer_steps = 0, 0

    # Load previous checkpoint; the settings given now (a new learning rate…) apply to the restored optimiser.
    if resume is not None:
        load_lora(lora, resume.checkpoint)
        optimizer.load_state_dict(resume.state.optimizer)
        for group in optimizer.param_groups:
            group.update(optimizer_settings(cfg.train))
        if resume.state.grad_scaler and scaler.is_enabled():
            scaler.load_state_dict(resume.state.grad_scaler)
        start_epoch, optimizer_steps = resume.state.epochs_done, resume.state.optimizer_steps
    # The transformer's only buffer is a fixed positional table: broadcasting it every forward (DDP's default)
    # would put a collective in each micro-batch and lock the ranks into step.
    model = (DistributedDataParallel(pipe.transformer, broadcast_buffers=False) if distributed.world_size() > 1
             else pipe.transformer)
    run_dir = open_run_dir(settings, asdict(plan), cfg.runs_dir, cfg.run_name or cfg.default_run_name, resume)
    log = RunLog(run_dir, cfg.log_wandb, resume_epoch=start_epoch if resume else None)

    # Main training loop.
    epochs_run = 0
    try:
        for epoch in range(start_epoch, cfg.num_epochs):
            timer, epoch_start = PhaseTimer(device), time.perf_counter()

            # Sample pairs and score them (paper §2, §6).
            samples = sample_and_score(pipe, text_encoders, reward_models, reward, stream, cfg, plan, epoch,
                                       compute_dtype, timer)

            # Turn rewards into finite-difference targets and share them with every rank (§3).
            with timer("share"):
                signal = share_signal(samples)

            # Optimise the LoRA on (sample, timestep) items shuffled across ranks (§4).
            steps = optimise_epoch(model, lora, optimizer, scaler, samples, signal, cfg, plan, epoch, optimizer_steps,
                                   timer)
            optimizer_steps += len(steps)

            # Report.
            report_epoch(log, epoch, samples, steps, timer, plan, time.perf_counter() - epoch_start, cfg)
            epochs_run += 1

            # Save checkpoint.
            if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.num_epochs:
                if distributed.is_main():
                    state = TrainingState(epoch + 1, optimizer_steps, plan.total_pairs, optimizer.state_dict(),
                                          scaler.state_dict())
                    print(f"Saved {save_checkpoint(run_dir, lora, state, settings)}", flush=True)
                distributed.barrier()

        # Show what training did: the same prompts and seeds before and after.
        text_encoders.to_device()
        reward_models.to_device()
        write_before_after(pipe, lora, reward, cfg.sample, cfg.num_epochs, run_dir / BEFORE_AFTER)
        distributed.print0(f"Wrote {run_dir / BEFORE_AFTER} and {run_dir / REWARD_CURVE}")
    except BaseException as stop:
        if distributed.is_main():
            report_stop(run_dir, stop, new_folder=resume is None or resume.run_dir is None, epochs_run=epochs_run)
        raise
    finally:
        log.close()
    return run_dir


def announce(settings: dict[str, Any], plan: BatchPlan, pairs_asked: int, resume: Resume | None) -> None:
    """Print the resolved settings and batch plan, and in a line each what was rounded or changed on resume."""
    distributed.print0(json.dumps({"config": settings, "batch_plan": asdict(plan)}, indent=2))
    if plan.total_pairs != pairs_asked:
        distributed.print0(f"--total-pairs-per-epoch {pairs_asked} rounds down to {plan.total_pairs}: "
                           f"{plan.pairs_per_rank} pairs on each of {plan.world_size} rank(s), a multiple of what "
                           f"{plan.gradient_steps_per_epoch} gradient steps per epoch divide evenly.")
    if resume is None:
        return
    distributed.print0(f"Resuming from {resume.checkpoint}: {resume.state.epochs_done} epochs and "
                       f"{resume.state.optimizer_steps} optimiser steps done.")
    if resume.run_dir is None:
        distributed.print0("It is not its run's newest checkpoint, so the run continues in a new folder (a branch "
                           "that records its parent): the two never mix.")
    if resume.changes:
        distributed.print0("Changed on resume (recorded in config.json's history): " + ", ".join(
            f"{name} {old} → {new}" for name, (old, new) in resume.changes.items()) + ".")


def report_stop(run_dir: Path, stop: BaseException, new_folder: bool, epochs_run: int) -> None:
    """After a crash or Ctrl-C: remove a new run folder that holds no finished epoch, and say where things stand."""
    if new_folder and epochs_run == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        where = f"No epoch had finished, so the new run folder {run_dir} was removed."
    else:
        done = run_checkpoints(run_dir)
        where = (f"The last checkpoint is {done[-1]}; continue with: python train.py --resume-from {run_dir}"
                 if done else f"No checkpoint was written yet in {run_dir}; the run has to start again.")
    if isinstance(stop, KeyboardInterrupt):
        print(f"\nInterrupted. {where}", flush=True)
    else:
        print(f"The run stopped with an error. {where}", flush=True)


def optimizer_settings(train: TrainPhaseConfig) -> dict[str, Any]:
    """AdamW's hyper-parameters from the settings (also applied to a resumed optimiser's state)."""
    return dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                weight_decay=train.weight_decay)


def make_optimizer(lora: torch.nn.Module, train: TrainPhaseConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], **optimizer_settings(train))


def sample_and_score(pipe: Any, text_encoders: Parking, reward_models: Parking, reward: Reward,
                     stream: PromptStream, cfg: TrainConfig, plan: BatchPlan, epoch: int, compute_dtype: torch.dtype,
                     timer: PhaseTimer) -> RankSamples:
    """This rank's pairs of the epoch: global pairs rank·P … rank·P + P − 1, each from its own seeded noise.

    Every batch's prompts are encoded first, so that the text encoders are parked before the reward models
    come back to the GPU and sampling starts; the reward models are parked again once the last batch is scored.
    """
    device = pipe.transformer.device
    first_pair = distributed.rank() * plan.pairs_per_rank
    pair_ids = [range(first_pair + b * plan.sampling_batch, first_pair + (b + 1) * plan.sampling_batch)
                for b in range(plan.sampling_calls)]
    prompts = [stream.prompts_for(epoch, ids) for ids in pair_ids]
    with timer("encode"):
        text_encoders.to_device()
        conds = [encode_prompts(pipe, batch, cfg.sample.guidance_scale, cfg.sample.max_sequence_length).to(compute_dtype)
                 for batch in prompts]
        text_encoders.park()
        reward_models.to_device()
    pipe.transformer.eval()
    batches = []
    for ids, batch, cond in tqdm(list(zip(pair_ids, prompts, conds)), desc=f"epoch {epoch} sampling",
                                 disable=not distributed.is_main(), leave=False):
        with timer("sample"):
            generators = [pair_generator(cfg.seed, epoch, g, device) for g in ids]
            traj = sample_pairs(pipe, cond, generators, cfg.sample.num_solver_steps, cfg.sample.churn_weight,
                                cfg.sample.guidance_scale, cfg.sample.resolution)
        with timer("reward"):
            scores = reward(traj.images, [p for p in batch for _ in range(2)])
        batches.append((traj, scores, cond, batch))
    reward_models.park()
    trajs, scores, conds, prompts = zip(*batches)
    cat = torch.cat
    return RankSamples(
        inputs=cat([t.inputs for t in trajs]).flatten(0, 1), velocities=cat([t.velocities for t in trajs]).flatten(0, 1),
        sigmas=trajs[0].sigmas, final_latents=cat([t.final_latents for t in trajs]),
        rewards=cat([s.total for s in scores]), terms={k: cat([s.terms[k] for s in scores]) for k in scores[0].terms},
        cond=PromptEmbeds(cat([c.embeds for c in conds]), cat([c.pooled for c in conds]),
                          conds[0].uncond_embeds[:1] if conds[0].uncond_embeds is not None else None,
                          conds[0].uncond_pooled[:1] if conds[0].uncond_pooled is not None else None),
        prompts=[p for batch in prompts for p in batch], first_images=trajs[0].images[:2].cpu(),
    )


def share_signal(samples: RankSamples) -> SharedSignal:
    """d and dR of every sample of every rank, and every pair's prompt embeddings (small next to the trajectories)."""
    gather = distributed.all_gather_tensor
    d = normalise(endpoint_differences(samples.final_latents))
    dR = reward_differences(samples.rewards)
    cond = PromptEmbeds(gather(samples.cond.embeds), gather(samples.cond.pooled),
                        samples.cond.uncond_embeds, samples.cond.uncond_pooled)
    return SharedSignal(d=gather(d), dR=gather(dR), cond=cond)


def optimise_epoch(model: torch.nn.Module, lora: Any, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   samples: RankSamples, signal: SharedSignal, cfg: TrainConfig, plan: BatchPlan, epoch: int,
                   steps_before: int, timer: PhaseTimer) -> list[dict[str, float]]:
    """`gradient_steps_per_epoch` optimiser steps; step k trains on slice k of the epoch's global item shuffle.

    Timed phases: "exchange" (items fetched from their ranks), "train" (micro-batches without gradient
    sync), "train_sync" (each step's last micro-batch, whose backward all-reduces the gradients), "optimizer".
    """
    T = cfg.sample.num_solver_steps
    items_per_rank = 2 * plan.pairs_per_rank * T
    permutation = item_permutation(cfg.seed, epoch, items_per_rank * plan.world_size)
    micro_batches = plan.micro_batches_per_step
    params = [p for p in lora.parameters() if p.requires_grad]
    lora.train()
    stats = []
    bar = tqdm(total=plan.gradient_steps_per_epoch * micro_batches, desc=f"epoch {epoch} training",
               disable=not distributed.is_main(), leave=False)
    for k in range(plan.gradient_steps_per_epoch):
        items = step_items(permutation, k, plan.gradient_steps_per_epoch)
        mine = rank_slice(items, distributed.rank(), plan.world_size).to(samples.inputs.device)
        with timer("exchange"):
            x, v_ref = fetch_items([samples.inputs, samples.velocities], items, items_per_rank)

        def backward_micro_batch(m: int) -> torch.Tensor:
            """Accumulate micro-batch m's gradient; returns its loss, policy loss, kl, clipfrac and mean |ρ − 1|."""
            rows = slice(m * plan.micro_batch, (m + 1) * plan.micro_batch)
            terms = micro_batch_loss(model, lora, x[rows], v_ref[rows], mine[rows], samples.sigmas, signal, cfg)
            scaler.scale(terms.loss / micro_batches).backward()
            bar.update()
            return torch.stack([terms.loss.detach(), terms.policy_loss, terms.kl, terms.clipfrac,
                                (terms.ratio - 1).abs().mean()])

        # Timed per phase, not per micro-batch, so that the GPU is synchronised twice a step, not twice a micro-batch.
        accumulate_locally = model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()
        with timer("train"), accumulate_locally:
            per_micro_batch = [backward_micro_batch(m) for m in range(micro_batches - 1)]
        with timer("train_sync"):  # the last micro-batch's backward all-reduces the step's gradients
            per_micro_batch.append(backward_micro_batch(micro_batches - 1))
        if k == 0:
            ratio_dev_first = per_micro_batch[0][4].item()
        with timer("optimizer"):
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm).item()
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped when a gradient is not finite (fp16 overflow); the scale then halves
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        totals = distributed.all_reduce_mean(torch.stack(per_micro_batch)[:, :4].mean(dim=0))
        skipped = not math.isfinite(grad_norm)
        stats.append({"kind": "step", "epoch": epoch, "step": steps_before + k + 1, "loss": totals[0].item(),
                      "policy_loss": totals[1].item(), "kl": totals[2].item(), "clipfrac": totals[3].item(),
                      "grad_norm": None if skipped else grad_norm, "lr": optimizer.param_groups[0]["lr"],
                      **({"grad_scale": scale, "skipped": skipped} if scaler.is_enabled() else {}),
                      "wall_time": time.time()})
    bar.close()
    stats[0]["ratio_dev_first_micro_batch"] = ratio_dev_first
    return stats


def micro_batch_loss(model: torch.nn.Module, lora: Any, x: torch.Tensor, v_ref: torch.Tensor, items: torch.Tensor,
                     sigmas: torch.Tensor, signal: SharedSignal, cfg: TrainConfig):
    """The surrogate loss of a micro-batch of items, v_θ computed exactly as during sampling."""
    T = cfg.sample.num_solver_steps
    sample, t = torch.div(items, T, rounding_mode="floor"), items % T
    pair = torch.div(sample, 2, rounding_mode="floor")
    cond = PromptEmbeds(
        signal.cond.embeds[pair], signal.cond.pooled[pair],
        None if signal.cond.uncond_embeds is None else signal.cond.uncond_embeds.expand(len(items), -1, -1),
        None if signal.cond.uncond_pooled is None else signal.cond.uncond_pooled.expand(len(items), -1),
    )
    guidance = cfg.sample.guidance_scale
    v_theta = predict_velocity(model, x, sigmas[t], cond, guidance)
    v_base = None
    if cfg.train.kl_weight > 0:
        with torch.no_grad(), lora.disable_adapter():
            v_base = predict_velocity(model, x, sigmas[t], cond, guidance)
    return surrogate_loss(v_theta, v_ref, signal.d[sample], signal.dR[sample], cfg.train.clip_range,
                          cfg.train.kl_weight, v_base)


def report_epoch(log: RunLog, epoch: int, samples: RankSamples, steps: list[dict[str, float]], timer: PhaseTimer,
                 plan: BatchPlan, seconds: float, cfg: TrainConfig) -> None:
    """One JSONL record per optimiser step and one per epoch; a line on stdout; image pairs to W&B every 10 epochs."""
    rewards = distributed.all_gather_tensor(samples.rewards)
    terms = {k: distributed.all_gather_tensor(v) for k, v in samples.terms.items()}
    for record in steps:
        log.write(record)
    record = {"kind": "epoch", "epoch": epoch, "reward_evaluations": 2 * plan.total_pairs * (epoch + 1),
              "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
              **{f"reward_{k}": v.mean().item() for k, v in terms.items()},
              **{f"reward_{k}_std": v.std().item() for k, v in terms.items()},
              **{f"time_{k}": v for k, v in timer.seconds.items()}, "time_epoch": seconds,
              "pairs_per_s": plan.total_pairs / seconds,
              **{f"peak_vram_gib_{k}": v for k, v in timer.peak_gib.items()}}
    images = None
    if epoch % 10 == 0:  # the first pair side by side, for W&B
        r = samples.rewards[:2].tolist()
        side_by_side = to_uint8(torch.cat(list(samples.first_images), dim=2)).permute(1, 2, 0).numpy()
        images = {"pair": (side_by_side, f"R = {r[0]:.3f} | {r[1]:.3f}: {samples.prompts[0]}")}
    log.write(record, images)
    # The loss is not printed: on the sampling policy (an epoch's first step) it is exactly 0, as dR sums to 0.
    norms = [s["grad_norm"] for s in steps if s["grad_norm"] is not None]
    skipped = sum(s.get("skipped", False) for s in steps)
    distributed.print0(f"epoch {epoch}: reward {record['reward_mean']:.4f} ± {record['reward_std']:.4f}, "
                       f"clipfrac {sum(s['clipfrac'] for s in steps) / len(steps):.3f}, "
                       f"grad norm {sum(norms) / len(norms) if norms else float('nan'):.3g}, "
                       + (f"{skipped} of {len(steps)} steps skipped (fp16 overflow), " if skipped else "")
                       + f"{record['pairs_per_s']:.2f} pairs/s")
