"""train.py's body, the epoch of every method: sample → score → what to train on (the method's part, fdfo/methods/)
→ optimise on items shuffled across ranks → report → save."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fdfo import distributed, signals
from fdfo.config import TrainConfig, check_train_config, to_jsonable
from fdfo.evaluation.before_after import BEFORE_AFTER, write_before_after
from fdfo.harness.batching import BatchSizes, plan_batches
from fdfo.harness.console import announce, epoch_line, stop_message
from fdfo.harness import memory
from fdfo.harness.learner import Passes, set_up
from fdfo.harness.optimise import optimise_epoch
from fdfo.harness.prompts import PromptStream, load_prompts, prompts_digest
from fdfo.harness.timing import PhaseTimer
from fdfo.methods import build_method
from fdfo.methods.base import Epoch, EpochScores
from fdfo.model.parking import Parking
from fdfo.runs.plots import REWARD_CURVE
from fdfo.runs import lock
from fdfo.runs.resume import claim_run, plan_resume
from fdfo.runs.runlog import RunLog, close_run_dir, open_run_dir


def train(cfg: TrainConfig) -> Path:
    """Run (or continue) a training run; returns its run folder."""
    # Initialize: every setting, the prompts and the checkpoint are checked before anything loads or is written.
    check_train_config(cfg)
    method = build_method(cfg)
    method.check()
    device = distributed.init()
    plan = plan_batches(cfg.total_pairs_per_epoch, distributed.world_size(), cfg.gradient_steps_per_epoch,
                        method.items_per_sample, BatchSizes(cfg.max_batch_size, cfg.sample.batch_size,
                                                            cfg.train.batch_size, cfg.train.micro_batch))
    method.check_plan(plan)
    prompts = load_prompts(cfg.prompt_file)
    stream, digest = PromptStream(prompts, cfg.seed, plan.total_pairs), prompts_digest(prompts)
    settings = to_jsonable(cfg)
    resume = plan_resume(cfg.resume_from, settings, plan.total_pairs, digest) if cfg.resume_from else None
    if resume is not None and claim_run(resume, cfg.dry_run):  # a run continued in place is locked, then tidied:
        resume = plan_resume(cfg.resume_from, settings, plan.total_pairs, digest)  # a checkpoint put back is its newest
    announce(settings, plan, cfg.total_pairs_per_epoch, resume)
    if cfg.dry_run:
        return Path(cfg.runs_dir) / f"<next id>-{cfg.run_name or cfg.default_run_name}"

    # Set up the model, its LoRA, the reward and the optimiser (restored from the checkpoint on resume).
    learner = set_up(cfg, device, resume, method.lora_copies, park_rewards=not method.needs_gradients)
    if cfg.max_memory_gib is not None:  # batch sizes as executed that fit the budget (the paper's split stays)
        fitted = memory.fit(cfg.max_memory_gib, plan, memory.shapes(learner.backbone, cfg.sample, method.items_per_sample),
                            memory.sizes(learner, device))
        plan = fitted.plan
        if plan.activation_checkpointing:
            learner.backbone.transformer.enable_gradient_checkpointing()
        if fitted.transformer_parked_to_encode:
            learner.transformer_weights = Parking([learner.backbone.transformer], device)
        distributed.print0(fitted.describe(cfg.max_memory_gib))
    run_dir = open_run_dir(settings, asdict(plan), cfg.runs_dir, cfg.run_name or cfg.default_run_name, resume)
    lock.hold(run_dir)  # a new run's or a branch's folder; a run continued in place holds its lock already
    log = RunLog(run_dir, cfg.log_wandb, resume_epoch=learner.epochs_done if resume else None)

    # Main training loop. A Ctrl-C or SIGTERM stops it at the next transformer pass, micro-batch or epoch: never
    # inside a checkpoint or a log record (fdfo/signals.py).
    epochs_run = 0
    try:
        with signals.deferred():
            for epoch in range(learner.epochs_done, cfg.num_epochs):
                signals.check()
                timer = PhaseTimer(device)

                # Sample, score, and turn the rewards into training items: the method's own part (FDFO: §2, §3).
                scores, items = method.epoch(learner, Epoch(epoch, stream, plan, timer))

                # Optimise the LoRA on (sample, timestep) items shuffled across ranks (§4).
                steps = optimise_epoch(learner, items, plan, timer)
                del items  # not held on the GPU through the next epoch's encoding and sampling
                learner.epochs_done = epoch + 1

                # Report.
                record = epoch_record(epoch, scores, timer, plan.total_pairs, learner.passes())
                log.write_epoch(record, [{"kind": "step", "epoch": epoch, **s} for s in steps],
                                (scores.first_images, scores.rewards[:2].tolist(), scores.prompts[0]))
                distributed.print0(epoch_line(record, steps))
                epochs_run += 1

                # Save checkpoint.
                if (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.num_epochs:
                    learner.save(run_dir, plan.total_pairs, digest, settings)

            # Show what training did: the same prompts and seeds before and after.
            signals.check()
            learner.text_encoders.to_device()
            learner.reward_models.to_device()
            write_before_after(learner.backbone, learner.lora, learner.reward, cfg.sample, cfg.num_epochs, run_dir / BEFORE_AFTER)
            distributed.print0(f"Wrote {run_dir / BEFORE_AFTER} and {run_dir / REWARD_CURVE}")
    except BaseException as stop:
        kept = close_run_dir(run_dir, new_folder=resume is None or resume.run_dir is None, epochs_run=epochs_run)
        distributed.print0(stop_message(run_dir, stop, kept))
        raise
    finally:
        log.close()
        lock.release()
    return run_dir


def epoch_record(epoch: int, scores: EpochScores, timer: PhaseTimer, total_pairs: int,
                 passes: Passes) -> dict:
    """The epoch's log record: rewards of all ranks (mean and spread, per term too), the cost so far (reward
    evaluations and samples through the transformer), time and memory per phase."""
    seconds = timer.elapsed()
    rewards = distributed.all_gather_tensor(scores.rewards)
    terms = {k: distributed.all_gather_tensor(v) for k, v in scores.terms.items()}
    return {"kind": "epoch", "epoch": epoch, "reward_evaluations": 2 * total_pairs * (epoch + 1),
            "transformer_forwards": passes.forward, "transformer_backwards": passes.backward,
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
            **{f"reward_{k}": v.mean().item() for k, v in terms.items()},
            **{f"reward_{k}_std": v.std().item() for k, v in terms.items()},
            **{f"time_{k}": v for k, v in timer.seconds.items()}, "time_epoch": seconds,
            "pairs_per_s": total_pairs / seconds, **{f"peak_vram_gib_{k}": v for k, v in timer.peak_gib.items()}}
