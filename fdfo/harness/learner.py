"""What a training run holds from epoch to epoch: the base model with its LoRA, the reward, the optimiser, the
gradient scaler, the EMA, a method's own copies of the LoRA weights and the count of forward passes. Set up once
per run, restored from a checkpoint on resume, saved into one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.nn.parallel import DistributedDataParallel

from fdfo import distributed, signals
from fdfo.errors import UserError
from fdfo.config import SampleConfig, TrainConfig, TrainPhaseConfig
from fdfo.harness import memory
from fdfo.model.compile import compile_blocks, should_compile
from fdfo.model.backbone import Backbone, PromptEmbeds
from fdfo.model.loading import backbone_class, load_backbone, training_dtypes
from fdfo.model.lora import attach_lora, load_lora, load_lora_copy, trainable
from fdfo.model.parking import Parking
from fdfo.rewards import Reward, Scorers, build_reward, reward_terms, twins_for
from fdfo.runs.checkpoint import TrainingState, save_checkpoint
from fdfo.runs.ema import EMA_FOLDER, LoraEma, load_ema, start_ema
from fdfo.runs.resume import Resume


class TrainingDiverged(UserError, FloatingPointError):
    """A step that would train non-finite weights: the run stops before saving anything of it."""


@dataclass
class Passes:
    """Samples through the transformer: forward (a checkpoint's recomputation included) and backward."""

    forward: int | None
    backward: int | None


@dataclass
class Learner:
    backbone: Backbone  # the base model (SD3, FLUX) and its pipeline
    lora: PeftModel  # the LoRA-wrapped transformer (the pipeline runs the same modules)
    model: torch.nn.Module  # what training calls: the transformer, in DDP with several ranks
    reward: Reward
    text_encoders: Parking  # off the GPU once the epoch's prompts are encoded (--memory-efficient)
    reward_models: Parking  # off the GPU while the LoRA trains (--memory-efficient)
    transformer_weights: Parking  # its base weights off the GPU while the prompts are encoded (where a
    # --max-memory-gib budget needs it; otherwise empty)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # loss scaling of the fp16 recipe; disabled otherwise
    ema: LoraEma | None  # with --ema-decay
    copies: dict[str, list[torch.Tensor]]  # a method's own copies of the LoRA weights, by name (DiffusionNFT's)
    compute_dtype: torch.dtype  # of sampling and training alike
    max_grad_norm: float  # the gradient is clipped to this norm before every step
    epochs_done: int = 0
    optimizer_steps: int = 0
    rows: list[int] = field(default_factory=lambda: [0, 0])  # samples through the transformer on this rank in
    # this process: [forward, of which differentiated] (sampling, training…)
    rows_before: list[int | None] = field(default_factory=lambda: [0, 0])  # on all ranks before this process
    # (checkpoint); None: not counted

    def step(self) -> tuple[float, float]:
        """Clip the accumulated gradient and take an optimiser step (skipped by the scaler if a gradient is not
        finite: an fp16 overflow); update the EMA. Returns (gradient norm, not finite when skipped; loss scale).
        Without a scaler, a gradient that is not finite stops the run, as do weights that the step made so:
        nothing non-finite is ever saved."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable(self.lora), self.max_grad_norm).item()
        where = f"Epoch {self.epochs_done}, optimiser step {self.optimizer_steps + 1}"
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise TrainingDiverged(f"{where}: the gradient norm is {grad_norm}, so the step was not taken. Look for "
                                   "a reward or loss that is not finite, or lower --train.learning-rate.")
        scale = self.scaler.get_scale()
        try:
            self.scaler.step(self.optimizer)
        except RuntimeError as e:  # AdamW's step size lr / (1 − β₁ᵗ) beyond float32
            if "overflow" not in str(e):
                raise
            raise TrainingDiverged(f"{where}: the optimiser's update overflows float32 ({e}). Lower "
                                   "--train.learning-rate.") from None
        self.scaler.update()  # the scale halves after a skipped step
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.stack(torch._foreach_norm(trainable(self.lora))).isfinite().all():
            raise TrainingDiverged(f"{where}: the step left LoRA weights that are not finite (gradient norm "
                                   f"{grad_norm:.3g}). Resume from the last checkpoint with a lower "
                                   "--train.learning-rate.")
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.step(trainable(self.lora), self.optimizer_steps)
        return grad_norm, scale

    def encode(self, prompt_batches: list[list[str]], sample: SampleConfig) -> list[PromptEmbeds]:
        """Every batch's prompt embeddings in the compute dtype. Then the text encoders are parked and the reward
        models come back to the GPU, before sampling starts (with --memory-efficient); where a memory budget needs
        it, the transformer's base weights make room for the text encoders meanwhile."""
        self.transformer_weights.park()
        self.text_encoders.to_device()
        conds = [self.backbone.encode(batch, sample.guidance_scale, sample.max_sequence_length).to(self.compute_dtype)
                 for batch in prompt_batches]
        self.text_encoders.park()
        self.transformer_weights.to_device()
        self.reward_models.to_device()
        return conds

    @torch.no_grad()
    def reference_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds,
                           guidance_scale: float) -> torch.Tensor:
        """v(x, σ) of the LoRA-free base model, the anchor of the methods' KL terms."""
        with self.lora.disable_adapter():
            return self.backbone.velocity(self.model, x, sigma, cond, guidance_scale)

    def count_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the transformer: the cost axis of the methods' comparison (a CFG call counts twice).
        A pass with gradient will be back-propagated once; one inside a backward pass is a checkpoint's
        recomputation: a forward only. Outside a backward pass, a pass is also where a Ctrl-C or SIGTERM stops
        the run (nothing is being written then)."""
        rows = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[0]
        outside_backward = torch._C._current_graph_task_id() == -1
        if outside_backward:
            signals.check()
        self.rows[0] += rows
        if torch.is_grad_enabled() and outside_backward:
            self.rows[1] += rows

    def passes(self) -> Passes:
        """Samples through the transformer forward and backward on all ranks since the run began (a collective:
        every rank calls it); None when resumed from a checkpoint of an fdfo that did not count them."""
        rows = torch.tensor(self.rows, dtype=torch.int64, device=self.backbone.transformer.device)
        total = distributed.all_reduce_sum(rows).tolist()
        return Passes(*[None if before is None else before + n for before, n in zip(self.rows_before, total)])

    def lora_copies(self) -> dict[str, list[torch.Tensor]]:
        """Every copy of the LoRA weights a checkpoint holds besides the LoRA, by folder name."""
        return {**({EMA_FOLDER: self.ema.weights} if self.ema is not None else {}), **self.copies}

    # The training state, saved and loaded by the same names (TrainingState's fields).
    def state(self, total_pairs: int, prompts_sha256: str, passes: Passes) -> TrainingState:
        return TrainingState(epochs_done=self.epochs_done, optimizer_steps=self.optimizer_steps,
                             total_pairs=total_pairs, optimizer=self.optimizer.state_dict(),
                             grad_scaler=self.scaler.state_dict(),
                             ema_steps=self.ema.updates if self.ema else 0, forward_passes=passes.forward,
                             backward_passes=passes.backward, prompts_sha256=prompts_sha256)

    def load_state(self, state: TrainingState, train: TrainPhaseConfig) -> None:
        """The state of a checkpoint; the optimiser settings given now (a new learning rate…) apply."""
        self.epochs_done, self.optimizer_steps = state.epochs_done, state.optimizer_steps
        self.optimizer.load_state_dict(state.optimizer)
        for group in self.optimizer.param_groups:
            group.update(optimizer_settings(train))
        if state.grad_scaler and self.scaler.is_enabled():
            self.scaler.load_state_dict(state.grad_scaler)
        self.rows_before = [state.forward_passes, state.backward_passes]
        # state.total_pairs and prompts_sha256 are checked by the resume plan; state.ema_steps by restore.

    def save(self, run_dir: Path, total_pairs: int, prompts_sha256: str, settings: dict[str, Any]) -> None:
        """A checkpoint of the epochs done so far (rank 0 writes it; every rank waits for it)."""
        state = self.state(total_pairs, prompts_sha256, self.passes())
        if distributed.is_main():
            print(f"Saved {save_checkpoint(run_dir, self.lora, state, settings, self.lora_copies())}", flush=True)
        distributed.barrier()


def set_up(cfg: TrainConfig, device: torch.device, resume: Resume | None, copies: tuple[str, ...] = (),
           park_rewards: bool = True) -> Learner:
    """Load the model, attach its LoRA, build the reward and the optimiser, start the LoRA `copies` a method
    keeps at the LoRA's weights; restore them all from `resume`. `park_rewards`: the reward models may leave
    the GPU while the LoRA trains (with --memory-efficient)."""
    auto = backbone_class(cfg.pretrained_model).auto_precision
    weights_dtype, compute_dtype = training_dtypes(cfg.precision, device, auto)
    if cfg.max_memory_gib is not None:
        memory.cap(cfg.max_memory_gib, device)
    backbone = load_backbone(cfg.pretrained_model, device, weights_dtype)
    backbone.vae.enable_slicing()  # decode one image at a time, as the published sampler: the decoder's peak / 12
    lora = attach_lora(backbone.transformer, cfg.lora_rank, cfg.lora_alpha, cfg.seed, backbone.lora_targets)
    if should_compile(cfg.compile, device):
        compile_blocks(backbone.blocks())  # compiled on first use: in the first sampling batch and micro-batch
    # Frozen models leave the GPU while not in use: leaving costs nothing, coming back one copy. Under a memory
    # budget, each group leaves as soon as it is built, so that they never share the GPU.
    text_encoders = Parking(backbone.text_encoders if cfg.memory_efficient else [], device)
    if cfg.max_memory_gib is not None:
        text_encoders.park()
    scorers = Scorers(device, twins_for(cfg.pretrained_model), purpose="reward", vlm_model_name=cfg.vlm_model_name,
                      shard_vlm=cfg.vlm_use_fsdp, vlm_buffers=cfg.vlm_buffers)
    reward = build_reward(reward_terms(cfg.reward_preset, cfg.reward), scorers)
    reward_models = Parking(reward.local_models() if cfg.memory_efficient and park_rewards else [], device)
    if cfg.max_memory_gib is not None:
        reward_models.park()
    optimizer = torch.optim.AdamW(trainable(lora), **optimizer_settings(cfg.train))
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)
    ema = start_ema(lora, cfg.ema_decay, cfg.ema_interval, cfg.ema_repeats) if cfg.ema_decay else None
    lora_copies = {name: [p.detach().clone() for p in trainable(lora)] for name in copies}
    # The transformer's only buffer is a fixed positional table: broadcasting it every forward (DDP's default)
    # would put a collective in each micro-batch and lock the ranks into step.
    model = (DistributedDataParallel(backbone.transformer, broadcast_buffers=False) if distributed.world_size() > 1
             else backbone.transformer)
    learner = Learner(backbone=backbone, lora=lora, model=model, reward=reward, text_encoders=text_encoders,
                      reward_models=reward_models, transformer_weights=Parking([], device), optimizer=optimizer, scaler=scaler, ema=ema, copies=lora_copies,
                      compute_dtype=compute_dtype, max_grad_norm=cfg.train.max_grad_norm)
    backbone.transformer.register_forward_pre_hook(learner.count_forward, with_kwargs=True)
    if resume is not None:
        restore(learner, resume, cfg)
    return learner


def restore(learner: Learner, resume: Resume, cfg: TrainConfig) -> None:
    """The checkpoint's LoRA, its copies (the EMA, a method's own), the optimiser and the scaler."""
    state = resume.state
    if learner.ema is not None and state.ema_steps:
        learner.ema = load_ema(learner.lora, resume.checkpoint, cfg.ema_decay, cfg.ema_interval, cfg.ema_repeats,
                               state.ema_steps)
    for name in learner.copies:
        learner.copies[name] = load_lora_copy(learner.lora, resume.checkpoint / name)
    load_lora(learner.lora, resume.checkpoint)
    if learner.ema is not None and not state.ema_steps:  # an EMA asked for on resuming a run without one starts here
        learner.ema = start_ema(learner.lora, cfg.ema_decay, cfg.ema_interval, cfg.ema_repeats)
    learner.load_state(state, cfg.train)


def optimizer_settings(train: TrainPhaseConfig) -> dict[str, Any]:
    """AdamW's hyper-parameters from the settings (also applied to a resumed optimiser's state)."""
    return dict(lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                weight_decay=train.weight_decay)
