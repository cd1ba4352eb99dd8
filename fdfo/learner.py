"""What a training run holds from epoch to epoch: the pipeline with its LoRA, the reward, the optimiser, the
gradient scaler, the EMA, DiffusionNFT's old policy and the count of forward passes. Set up once per run,
restored from a checkpoint on resume, saved into one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from fdfo import distributed
from fdfo.checkpoint import TrainingState, save_checkpoint
from fdfo.compile import compile_blocks, should_compile
from fdfo.config import SampleConfig, TrainConfig, TrainPhaseConfig
from fdfo.ema import OLD_POLICY_FOLDER, load_ema, load_lora_copy, start_ema, trainable
from fdfo.lora import attach_lora, load_lora
from fdfo.models import load_pipeline, training_dtypes
from fdfo.offload import Parking
from fdfo.resume import Resume
from fdfo.rewards import Reward, Scorers, build_reward, reward_terms, twins_for
from fdfo.sd3 import PromptEmbeds, encode_prompts


@dataclass
class Learner:
    pipe: StableDiffusion3Pipeline
    lora: PeftModel  # the LoRA-wrapped transformer (the pipeline runs the same modules)
    model: torch.nn.Module  # what training calls: the transformer, in DDP with several ranks
    reward: Reward
    text_encoders: Parking  # off the GPU once the epoch's prompts are encoded (--memory-efficient)
    reward_models: Parking  # off the GPU while the LoRA trains (--memory-efficient)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling of the fp16 recipe; disabled otherwise
    ema: EMAModel | None  # with --ema-decay
    old_policy: list[torch.Tensor] | None  # DiffusionNFT's lagged LoRA weights, which sample (--method diffusion_nft)
    compute_dtype: torch.dtype  # of sampling and training alike
    max_grad_norm: float  # the gradient is clipped to this norm before every step
    epochs_done: int = 0
    optimizer_steps: int = 0
    forward_rows: int = 0  # samples through the transformer on this rank in this process (sampling, training…)
    forward_rows_before: int | None = 0  # on all ranks before this process (checkpoint); None: not counted

    def step(self) -> tuple[float, float]:
        """Clip the accumulated gradient and take an optimiser step (skipped by the scaler if a gradient is not
        finite: an fp16 overflow); update the EMA. Returns (gradient norm, not finite when skipped; loss scale)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable(self.lora), self.max_grad_norm).item()
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()  # the scale halves after a skipped step
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(trainable(self.lora))
        self.optimizer_steps += 1
        return grad_norm, scale

    def encode(self, prompt_batches: list[list[str]], sample: SampleConfig) -> list[PromptEmbeds]:
        """Every batch's prompt embeddings in the compute dtype. Then the text encoders are parked and the reward
        models come back to the GPU, before sampling starts (with --memory-efficient)."""
        self.text_encoders.to_device()
        conds = [encode_prompts(self.pipe, batch, sample.guidance_scale, sample.max_sequence_length)
                 .to(self.compute_dtype) for batch in prompt_batches]
        self.text_encoders.park()
        self.reward_models.to_device()
        return conds

    def count_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the transformer: the cost axis of the methods' comparison (a CFG call counts twice)."""
        self.forward_rows += (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]

    def forward_passes(self) -> int | None:
        """Samples through the transformer on all ranks since the run began (a collective: every rank calls it);
        None when the run was resumed from a checkpoint of an fdfo that did not count them."""
        rows = torch.tensor([self.forward_rows], dtype=torch.int64, device=self.pipe.transformer.device)
        total = int(distributed.all_reduce_sum(rows).item())
        return None if self.forward_rows_before is None else self.forward_rows_before + total

    def save(self, run_dir: Path, total_pairs: int, settings: dict[str, Any]) -> None:
        """A checkpoint of the epochs done so far (rank 0 writes it; every rank waits for it)."""
        forward_passes = self.forward_passes()
        if distributed.is_main():
            state = TrainingState(self.epochs_done, self.optimizer_steps, total_pairs, self.optimizer.state_dict(),
                                  self.scaler.state_dict(), self.ema.optimization_step if self.ema else 0,
                                  forward_passes)
            print(f"Saved {save_checkpoint(run_dir, self.lora, state, settings, self.ema, self.old_policy)}", flush=True)
        distributed.barrier()


def set_up(cfg: TrainConfig, device: torch.device, resume: Resume | None) -> Learner:
    """Load the model, attach its LoRA, build the reward and the optimiser; restore them all from `resume`."""
    weights_dtype, compute_dtype = training_dtypes(cfg.precision, device)
    pipe = load_pipeline(cfg.pretrained_model, device, weights_dtype)
    pipe.vae.enable_slicing()  # decode one image at a time, as the published sampler: the decoder's peak memory / 12
    lora = attach_lora(pipe.transformer, cfg.lora_rank, cfg.lora_alpha, seed=cfg.seed)
    if should_compile(cfg.compile, device):
        compile_blocks(pipe.transformer)  # compiled on first use: in the first sampling batch and micro-batch
    scorers = Scorers(device, twins_for(cfg.pretrained_model), purpose="reward", vlm_model_name=cfg.vlm_model_name,
                      shard_vlm=cfg.vlm_use_fsdp, vlm_buffers=cfg.vlm_buffers)
    reward = build_reward(reward_terms(cfg.reward_preset, cfg.reward), scorers)
    # Frozen models leave the GPU while not in use: leaving costs nothing, coming back one copy.
    frozen = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], reward.local_models()
    text_encoders, reward_models = (Parking(modules if cfg.memory_efficient else [], device) for modules in frozen)
    optimizer = torch.optim.AdamW(trainable(lora), **optimizer_settings(cfg.train))
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    ema = start_ema(lora, cfg.ema_decay) if cfg.ema_decay else None
    old_policy = [p.detach().clone() for p in trainable(lora)] if cfg.method == "diffusion_nft" else None
    # The transformer's only buffer is a fixed positional table: broadcasting it every forward (DDP's default)
    # would put a collective in each micro-batch and lock the ranks into step.
    model = (DistributedDataParallel(pipe.transformer, broadcast_buffers=False) if distributed.world_size() > 1
             else pipe.transformer)
    learner = Learner(pipe=pipe, lora=lora, model=model, reward=reward, text_encoders=text_encoders,
                      reward_models=reward_models, optimizer=optimizer, scaler=scaler, ema=ema, old_policy=old_policy,
                      compute_dtype=compute_dtype, max_grad_norm=cfg.train.max_grad_norm)
    pipe.transformer.register_forward_pre_hook(learner.count_forward, with_kwargs=True)
    if resume is not None:
        restore(learner, resume, cfg)
    return learner


def restore(learner: Learner, resume: Resume, cfg: TrainConfig) -> None:
    """The checkpoint's LoRA, optimiser, scaler and EMA; the settings given now (a new learning rate…) apply."""
    state = resume.state
    if learner.ema is not None and state.ema_steps:
        learner.ema = load_ema(learner.lora, resume.checkpoint, cfg.ema_decay, state.ema_steps)
    if learner.old_policy is not None:
        learner.old_policy = load_lora_copy(learner.lora, resume.checkpoint / OLD_POLICY_FOLDER)
    load_lora(learner.lora, resume.checkpoint)
    if learner.ema is not None and not state.ema_steps:  # an EMA asked for on resuming a run without one starts here
        learner.ema = start_ema(learner.lora, cfg.ema_decay)
    learner.optimizer.load_state_dict(state.optimizer)
    for group in learner.optimizer.param_groups:
        group.update(optimizer_settings(cfg.train))
    if state.grad_scaler and learner.scaler.is_enabled():
        learner.scaler.load_state_dict(state.grad_scaler)
    learner.epochs_done, learner.optimizer_steps = state.epochs_done, state.optimizer_steps
    learner.forward_rows_before = state.forward_passes


def optimizer_settings(train: TrainPhaseConfig) -> dict[str, Any]:
    """AdamW's hyper-parameters from the settings (also applied to a resumed optimiser's state)."""
    return dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                weight_decay=train.weight_decay)
