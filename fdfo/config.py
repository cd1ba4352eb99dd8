"""Typed configuration of the three entry points. Defaults are the paper's (SPEC §5)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tyro

from fdfo.errors import UserError
from fdfo.formulas.gradient import TimeWeight
from fdfo.rewards.registry import reward_terms

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_PRESET = PROJECT_ROOT / "configs" / "tiny.toml"  # applied first for --pretrained-model tiny or tiny-flux
TINY_MODELS = ("tiny", "tiny-flux")

RewardPreset = Literal["combined", "pickscore", "vlm_alignment", "brightness", "compressibility"]
VlmName = Literal["qwenvl-7b", "qwenvl-3b"]
TrainPrecision = Literal["auto", "fp16", "bf16", "fp32"]
EvalPrecision = Literal["auto", "bf16", "fp32"]
ExportDtype = Literal["auto", "bf16", "fp16", "fp32"]
CompileMode = Literal["auto", "always", "never"]
Method = Literal["fdfo", "fdfo_grad", "flow_grpo", "diffusion_nft", "draft", "rsm"]  # the classes are registered in fdfo/methods/__init__.py


def method_recipe(method: str | None) -> Path | None:
    """configs/<method>.toml: the published recipe of a method that has one, applied first with --method."""
    path = PROJECT_ROOT / "configs" / f"{method}.toml"
    return path if method in typing.get_args(Method) and path.is_file() else None


class ConfigError(UserError, ValueError):
    """A configuration the run cannot use; the message says which flag to change."""


@dataclass(frozen=True)
class IntervalChurnConfig:
    """The published code's interval schedule: per pair, churn around one random noise level (fdfo/formulas/churn.py)."""

    mu: float = 1.0  # mean of the pair's centre in logit space
    sigma: float = 1.5  # spread of the pair's centre in logit space
    churn_weight: float = 1.0  # median of the pair's weight w, γ = exp(w · density) − 1
    churn_weight_sigma: float = 0.0  # log-normal spread of the weight
    soft_sigma: float = 0.25  # width of the logit-normal density around the centre


@dataclass(frozen=True)
class PriorChurnConfig:
    """The published code's prior schedule: per pair, churn of the initial noise only (fdfo/formulas/churn.py)."""

    churn_weight: float = 0.1  # median of the pair's weight w, γ = exp(w) − 1 at σ = 1
    churn_weight_sigma: float = 1.0  # log-normal spread of the weight


ChurnSchedule = Literal["raw", "interval", "prior"]


@dataclass(frozen=True)
class SampleConfig:
    """How pairs of trajectories are sampled."""

    num_solver_steps: int = 40  # Euler steps per trajectory (T)
    guidance_scale: float = 1.0  # classifier-free guidance weight, 1.0 = no CFG (SD3); the guidance embedding's value (FLUX.1-dev, which has no CFG)
    churn_schedule: ChurnSchedule = "raw"  # raw (the paper's: γ = churn_weight at every step), or the published code's interval or prior (their settings: --sample.interval.*, --sample.prior.*)
    churn_weight: float = 0.0025  # the raw schedule's churn strength γ of the initial perturbation and of every step but the last
    batch_size: int | None = None  # pairs per sampling batch on each rank; None = derived from the pairs per rank
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    max_sequence_length: int = 128  # T5 tokens of the prompt
    interval: IntervalChurnConfig = field(default_factory=IntervalChurnConfig)
    prior: PriorChurnConfig = field(default_factory=PriorChurnConfig)


@dataclass(frozen=True)
class TrainPhaseConfig:
    """How the LoRA is optimised on the sampled trajectories."""

    learning_rate: float = 3e-5  # AdamW learning rate
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    adam_eps: float = 1e-8  # AdamW ε
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm before every optimiser step
    clip_range: float = 0.03  # ε of the SPO-style surrogate: ratios further than ε from 1 count as clipped
    kl_weight: float = 0.0  # weight of mean((v_θ − v_base)²) against the LoRA-free model
    batch_size: int | None = None  # (sample, timestep) items per micro-batch on each rank; None = derived from the pairs per rank
    micro_batch: int | None = None  # items per forward/backward as executed, for speed (same gradient); None = batch_size raised to ≤ 10


@dataclass(frozen=True)
class FlowGrpoConfig:
    """Flow-GRPO's own settings (--method flow_grpo; published SD3.5-M recipe, fdfo/flow_grpo.py DEFAULTS)."""

    group_size: int = 24  # images per prompt, whose rewards are normalised together
    noise_level: float = 0.7  # a in the SDE's σ_t = a·sqrt(σ/(1 − σ))
    clip_range: float = 1e-4  # ε of the clipped ratio
    adv_clip_max: float = 5.0  # advantages clipped to ±this
    kl_weight: float = 0.01  # β of the KL penalty to the LoRA-free model's transition mean
    timestep_fraction: float = 0.99  # the first int(T·this) steps of every trajectory are trained on
    global_std: bool = True  # advantages divided by the std of all rewards (True, the recipe) or of the group's


@dataclass(frozen=True)
class DiffusionNftConfig:
    """DiffusionNFT's own settings (--method diffusion_nft; published SD3.5-M recipe, fdfo/diffusion_nft.py DEFAULTS)."""

    group_size: int = 24  # images per prompt, whose rewards are normalised together
    beta: float = 1.0  # β of the implicit policies v± around the old policy
    kl_weight: float = 1e-4  # weight of mean((v_θ − v_base)²) against the LoRA-free model
    adv_clip_max: float = 5.0  # Z: advantages clipped to ±Z, then r = 1/2 + A/(2Z)
    timestep_fraction: float = 0.99  # int(T·this) of the T sampler noise levels, drawn per sample, are trained on
    decay_type: Literal[0, 1, 2] = 1  # the old policy's schedule η(step): 1 = min(0.001·step, 0.5)
    global_std: bool = True  # advantages divided by the std of all rewards (True, the recipe) or of the group's
    solver: Literal["dpm2", "euler"] = "dpm2"  # the rollouts' ODE solver: the recipe's DPM-Solver++(2M) (`dpm2`), or Euler steps
    integer_timesteps: bool = True  # the rollouts feed the transformer ⌊1000σ⌋ as an integer, as the published pipeline does


@dataclass(frozen=True)
class DraftConfig:
    """DRaFT's own settings (--method draft; Clark et al., 2024, fdfo/methods/draft.py; its recipe configs/draft.toml)."""

    k: int = 1  # K: the reward's gradient goes back through the last K sampling steps (DRaFT-K; K = T: all of them)
    lv_samples: int = 0  # DRaFT-LV (K = 1): this many fresh noisings of the final sample, each denoised in one step; 0 = off
    kl_weight: float = 0.0  # DRaFT+'s weight of mean((v_θ − v_base)²) at the kept steps (NeMo-Aligner's kl_coeff); 0 = DRaFT
    checkpointing: bool = True  # recompute the kept steps' and the decoder's activations in the backward pass (memory)


@dataclass(frozen=True)
class RsmConfig:
    """Reward Score Matching's own settings (--method rsm, zeroth order; fdfo/methods/rsm.py; its recipe configs/rsm.toml)."""

    branches: tuple[int, ...] = (6, 6, 8, 10, 0, 0, 0, 0, 0)  # SDE branches off each seed's ODE trajectory at steps 0 … T−2 (the recipe's `lowsnr2`); a step without branches is a KL anchor
    seeds_per_prompt: int = 4  # ODE trajectories (seeds) per prompt (`num_image_per_prompt`)
    noise_level: float = 0.7  # a of the branches' SDE step, σ̃ = a·√(σ/(1 − σ))
    clip_range: float = 1e-4  # c of the hinge max(c·|A| + A·m, 0)
    adv_clip_max: float = 5.0  # advantages clipped to ±this
    kl_weight: float = 0.004  # β of the KL to the base model on the branch rows and the anchors (the recipe's GenEval preset)
    kl_anchor: bool = True  # the KL also at the ODE states of the steps without branches (`use_ode_kl_anchor`)


@dataclass(frozen=True)
class FdfoGradConfig:
    """The FDFO paper's gradient ablations (--method fdfo_grad; its Fig. 8 rows I and J, fdfo/methods/fdfo_grad.py):
    FDFO with the exact reward gradient in place of the finite difference."""

    chain: bool = False  # row J: the gradient carried back through the sampling chain to each step; False: row I, ∇R at the final latent for every step
    time_weight: TimeWeight = "constant"  # η(σ) on each step's signal: constant (the paper's rows), linear 1 − σ (Reward Score Matching's first order) or quadratic (1 − σ)²


@dataclass(frozen=True)
class TrainConfig:
    """FDFO training run: `python train.py` or `torchrun --nproc_per_node=N train.py`."""

    config: Path | None = None  # TOML file of settings (see configs/); flags given on the command line win
    pretrained_model: str = SD35_MEDIUM  # Hub id or local diffusers folder of an SD3/SD3.5 or FLUX.1 model; `tiny`, `tiny-flux` (offline CPU demo), `sd35m-random`, `sd35l-random`, `flux-random` (real shapes, random weights)
    method: Method = "fdfo"  # the method: fdfo (the paper's), its gradient ablations fdfo_grad, or flow_grpo, diffusion_nft, draft, rsm (same harness; their recipes in configs/)
    reward_preset: RewardPreset = "combined"  # reward terms and weights
    reward: tuple[str, ...] = ()  # reward terms as NAME=WEIGHT (e.g. pickscore=1 hpsv2=0.5, or your own my_pkg.my_rewards:score=1); given, they replace --reward-preset
    vlm_model_name: VlmName = "qwenvl-7b"  # Qwen2.5-VL size used by the VLM reward
    vlm_use_fsdp: tyro.conf.FlagConversionOff[bool] = True  # shard the VLM's parameters over the ranks (False: a full copy per rank)
    vlm_buffers: Literal["bf16", "fp32"] = "bf16"  # dtype of the VLM's rotary frequencies: bf16 as the published reward's FSDP1 mixed precision leaves them; fp32 exact
    num_epochs: int = 1000  # epochs to train (results are good around 100)
    total_pairs_per_epoch: int = 432  # pairs sampled per epoch over all ranks (2 reward evaluations each)
    gradient_steps_per_epoch: int = 4  # optimiser steps per epoch
    max_batch_size: int | None = None  # cap on all derived batch sizes; None = the paper's split (≤ 6, ≥ 8 ranks ≤ 13), executed in batches of ≤ 16 pairs and ≤ 12 items
    lora_rank: int = 32  # LoRA rank r
    lora_alpha: int = 64  # LoRA alpha (scale alpha / r)
    seed: int = 6  # seed of prompts, noise, shuffles and LoRA init
    ema_decay: float | None = None  # keep an exponential moving average of the LoRA weights with this decay, by the baselines' published rule: after step s, d = min(decay, (1 + s)/(10 + s)); saved in each checkpoint's ema/ folder; None = no EMA, as in the FDFO paper
    ema_interval: int = 1  # update the EMA after the optimiser steps s with (s + 1) a multiple of this (Flow-GRPO's recipe: 8)
    ema_repeats: int = 1  # updates each time, at the same weights (Flow-GRPO's code updates once per sampling batch of a GPU: 2 a step at its 32-GPU recipe)
    save_freq: int = 5  # write a checkpoint every this many epochs
    run_name: str | None = None  # run folder suffix; None = `<reward_preset or the --reward terms>-cfg_<guidance with . as p>`
    runs_dir: Path = Path("runs")  # parent of the run folders `<5-digit id>-<run name>/`
    resume_from: Path | None = None  # checkpoint folder, or run folder (= its newest checkpoint), to continue exactly
    prompt_file: Path = Path("prompt_sets/pickscore_train.txt")  # training prompts, one a line
    accept_changed_prompts: bool = False  # on resume, train on prompts that differ from the checkpoint's (recorded in config.json's history); otherwise refused
    log_wandb: bool = False  # also log to Weights & Biases
    memory_efficient: bool = True  # text encoders off the GPU after encoding, reward models off it while training
    max_memory_gib: float | None = None  # fit each GPU's peak within this many GiB (e.g. 22 on a 24 GB card): batch sizes as executed and activation checkpointing chosen to fit, frozen models parked at once, the allocator capped; same paper split and pairs, slower
    precision: TrainPrecision = "auto"  # numerics of sampling and training alike: fp16 = the published recipe (fp16 autocast over bf16 weights, fp32 LoRA, gradient scaler); bf16 autocast; fp32; auto = fp16 on GPU, fp32 on CPU
    compile: CompileMode = "auto"  # torch.compile each transformer block (sampling and training alike); auto = on GPU only
    dry_run: bool = False  # print the resolved configuration and stop before loading any model
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    grpo: FlowGrpoConfig = field(default_factory=FlowGrpoConfig)
    nft: DiffusionNftConfig = field(default_factory=DiffusionNftConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    grad: FdfoGradConfig = field(default_factory=FdfoGradConfig)
    rsm: RsmConfig = field(default_factory=RsmConfig)

    @property
    def default_run_name(self) -> str:
        reward = "+".join(term.partition("=")[0].replace(":", ".") for term in self.reward) or self.reward_preset
        method = "" if self.method == "fdfo" else f"{self.method}-"
        return f"{method}{reward}-cfg_{str(float(self.sample.guidance_scale)).replace('.', 'p')}"


ProtocolName = Literal["auto", "fdfo", "flow_grpo", "diffusion_nft"]


@dataclass(frozen=True)
class GenerateConfig:
    """Image grids from a checkpoint: `python generate.py --checkpoint CKPT --out out.jpg`."""

    config: Path | None = None  # TOML file of settings; flags given on the command line win
    checkpoint: str | None = None  # local folder, run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL; None = base model
    protocol: ProtocolName = "auto"  # whose published sampling settings fill those left unset: auto = those of the checkpoint's method (fdfo/evaluation/method_protocol.py)
    ema: bool = False  # use the checkpoint's EMA weights (a run trained with --ema-decay); Flow-GRPO's and DiffusionNFT's protocols use them where present
    own_weights: bool = False  # use the checkpoint's own weights where its protocol would take the EMA
    out: Path = Path("out.jpg")  # output image (JPEG quality 95; PNG by extension)
    prompts: Path | None = None  # prompt file, one a line; None = prompt_sets/generate_default.txt
    pretrained_model: str = SD35_MEDIUM  # base model: Hub id, local folder, or a random model (`tiny`, `tiny-flux`, `sd35m-random`…)
    grid_rows: int = 2  # image rows per prompt
    grid_cols: int = 2  # image columns per prompt
    seed: int = 0  # seed of the first image; image i of the grid (prompt-major) uses seed + i, as published
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    num_solver_steps: int | None = None  # Euler steps; None = the protocol's (40)
    guidance_scale: float | None = None  # classifier-free guidance weight, 1.0 = no CFG; None = the protocol's (FDFO 1.0, Flow-GRPO 4.5, DiffusionNFT 1.0)
    integer_timesteps: bool | None = None  # feed the transformer ⌊1000σ⌋ as an integer; None = the protocol's (DiffusionNFT's pipeline does)
    batch_size: int = 4  # images per forward batch
    max_sequence_length: int | None = None  # T5 tokens of the prompt; None = the protocol's (FDFO 256, the pipeline's default; Flow-GRPO and DiffusionNFT 128)
    precision: EvalPrecision = "auto"  # dtype of the plain pipeline; auto = bf16 on GPU (as published), fp32 on CPU


@dataclass(frozen=True)
class ExportConfig:
    """A LoRA checkpoint in diffusers' format: `python export.py --checkpoint CKPT --out FOLDER`."""

    config: Path | None = None  # TOML file of settings; flags given on the command line win
    checkpoint: str | None = None  # local folder, run folder (its newest checkpoint), `hf:<org>/<repo>/<subdir>` or a Hub tree URL
    ema: bool = False  # export the checkpoint's EMA weights (a run trained with --ema-decay)
    out: Path | None = None  # folder to write pytorch_lora_weights.safetensors into
    merged: bool = False  # also write the transformer with the LoRA merged into its weights, to <out>/transformer
    pretrained_model: str = SD35_MEDIUM  # base model (its pipeline class saves the LoRA; --merged merges into its transformer): Hub id, local folder or a random model
    dtype: ExportDtype = "auto"  # dtype the merged transformer is written in (merged in fp32); auto = the dtype the base model's transformer is stored in


MetricName = Literal[
    "pickscore", "hpsv2", "image_reward", "hpsv3", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality", "vlm_photo",
    "dreamsim_diversity",
]
PromptSetName = Literal["pickscore_train", "pickscore_test", "hpdv2"]


@dataclass(frozen=True)
class MetricsConfig:
    """The paper's evaluation metrics: `torchrun --nproc_per_node=N metrics.py --checkpoint CKPT ...`."""

    config: Path | None = None  # TOML file of settings; flags given on the command line win
    checkpoint: str | None = None  # local folder, run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL; None = base model
    protocol: ProtocolName = "auto"  # whose published evaluation fills the settings left unset: auto = that of the checkpoint's method (fdfo/evaluation/method_protocol.py)
    ema: bool = False  # evaluate the checkpoint's EMA weights (a run trained with --ema-decay); Flow-GRPO's and DiffusionNFT's protocols use them where present
    own_weights: bool = False  # evaluate the checkpoint's own weights where its protocol would take the EMA
    prompt_set: PromptSetName | None = None  # prompts to evaluate on; None = the protocol's (FDFO hpdv2, Flow-GRPO and DiffusionNFT pickscore_test)
    num_prompts: int | None = None  # prompts kept after shuffling (capped at the set's size); None = the protocol's (500; 2,048)
    num_repeats: int = 1  # images per prompt (dreamsim_diversity needs ≥ 2)
    metrics: tuple[MetricName, ...] = ("pickscore",)  # metrics to compute
    prompt_seed: int = 0  # seed of the prompt shuffle
    image_seed: int = 0  # image seeds are image_seed + prompt_index · num_repeats + repeat
    pretrained_model: str = SD35_MEDIUM  # base model: Hub id, local folder, or a random model (`tiny`, `tiny-flux`, `sd35m-random`…)
    vlm_model_name: VlmName = "qwenvl-7b"  # Qwen2.5-VL size used by the VLM metrics
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    num_solver_steps: int | None = None  # Euler steps; None = the protocol's (40)
    guidance_scale: float | None = None  # classifier-free guidance weight, 1.0 = no CFG; None = the protocol's (FDFO 1.0, Flow-GRPO 4.5, DiffusionNFT 1.0)
    integer_timesteps: bool | None = None  # feed the transformer ⌊1000σ⌋ as an integer; None = the protocol's (DiffusionNFT's pipeline does)
    batch_size: int = 4  # images per forward batch
    max_sequence_length: int | None = None  # T5 tokens of the prompt; None = the protocol's (FDFO 256, the pipeline's default; Flow-GRPO and DiffusionNFT 128)
    out: Path | None = None  # JSON file for the results, with the config and elapsed time
    precision: EvalPrecision = "auto"  # dtype of the plain pipeline; auto = bf16 on GPU (as published), fp32 on CPU


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


FLOAT32_MAX = 3.4028234663852886e38


def check_finite(cfg: Any, prefix: str = "--") -> None:
    """Every number of `cfg` (a settings dataclass, its sections too) is finite in float32, where the tensors
    use it: inf passes every `> 0` check and would train weights to inf; nan compares false with everything."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), prefix + f.name.replace("_", "-")
        if dataclasses.is_dataclass(value):
            check_finite(value, flag + ".")
        elif isinstance(value, float):
            require(math.isfinite(value) and abs(value) <= FLOAT32_MAX,
                    f"{flag} must be a finite number (float32's, at most 3.4e38 in size); got {value}.")


def check_seed(value: int, flag: str, below: int = 2**62) -> None:
    """Seeds are what the random generators take: numpy's SeedSequence no negative number, torch's none of
    2⁶⁴ or more, numpy's RandomState (the evaluation's prompt shuffle) none of 2³² or more."""
    require(0 <= value < below, f"{flag} must be a whole number from 0 to {below - 1}; got {value}.")


def check_run_name(name: str | None) -> None:
    require(name is None or (name not in ("", ".", "..") and not any(c in name for c in "/\\\0")),
            f"--run-name {name!r} must be a folder name: not empty, not . or .., without / or \\.")


def check_folder_writable(folder: Path, flag: str) -> None:
    """New files can be written in `folder`: probed with a file, in the folders created for it if need be,
    which are removed again (a check writes nothing)."""
    folder = Path(folder).absolute()
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fdfo-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {folder} cannot be written ({e.strerror or e}); choose another folder.") from None
    finally:
        for created in missing:  # deepest first
            with contextlib.suppress(OSError):
                created.rmdir()


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse settings the run cannot use, before anything is written or loaded."""
    check_finite(cfg)
    t, sample = cfg.train, cfg.sample
    for flag, value in [("--num-epochs", cfg.num_epochs), ("--total-pairs-per-epoch", cfg.total_pairs_per_epoch),
                        ("--gradient-steps-per-epoch", cfg.gradient_steps_per_epoch), ("--lora-rank", cfg.lora_rank),
                        ("--ema-interval", cfg.ema_interval), ("--ema-repeats", cfg.ema_repeats),
                        ("--lora-alpha", cfg.lora_alpha), ("--save-freq", cfg.save_freq),
                        ("--sample.num-solver-steps", sample.num_solver_steps),
                        ("--sample.max-sequence-length", sample.max_sequence_length)]:
        require(value >= 1, f"{flag} must be at least 1; got {value}.")
    for flag, value in [("--max-batch-size", cfg.max_batch_size), ("--sample.batch-size", sample.batch_size),
                        ("--train.batch-size", t.batch_size), ("--train.micro-batch", t.micro_batch)]:
        require(value is None or value >= 1, f"{flag} must be at least 1 (or left unset); got {value}.")
    check_resolution(sample.resolution, "--sample.resolution")
    require(cfg.max_memory_gib is None or cfg.max_memory_gib > 0,
            f"--max-memory-gib must be a positive number of GiB (or left unset); got {cfg.max_memory_gib}.")
    require(cfg.max_memory_gib is None or cfg.method in ("fdfo", "flow_grpo", "diffusion_nft"),
            f"--max-memory-gib estimates the memory of fdfo, flow_grpo and diffusion_nft; {cfg.method}'s (reward "
            "gradients, long back-propagation) is not modelled yet: set --train.micro-batch yourself instead.")
    require(cfg.max_memory_gib is None or cfg.memory_efficient, "--max-memory-gib parks the frozen models "
            "off the GPU while they are not used: drop --no-memory-efficient.")
    require(sample.churn_weight >= 0, f"--sample.churn-weight must be 0 or more (the paper's is 0.0025); got "
                                      f"{sample.churn_weight}.")
    require(sample.guidance_scale >= 0, f"--sample.guidance-scale must be 0 or more (1 = no guidance); got "
                                        f"{sample.guidance_scale}.")
    require(t.learning_rate >= 0, f"--train.learning-rate must be 0 or more (the paper's is 3e-5); got {t.learning_rate}.")
    for flag, value in [("--train.adam-beta1", t.adam_beta1), ("--train.adam-beta2", t.adam_beta2)]:
        require(0 <= value < 1, f"{flag} must be in [0, 1); got {value}.")
    require(t.adam_eps > 0, f"--train.adam-eps must be more than 0; got {t.adam_eps}.")
    require(t.weight_decay >= 0, f"--train.weight-decay must be 0 or more; got {t.weight_decay}.")
    require(t.max_grad_norm > 0, f"--train.max-grad-norm must be more than 0; got {t.max_grad_norm}.")
    require(t.clip_range > 0, f"--train.clip-range must be more than 0 (the paper's is 0.03); got {t.clip_range}.")
    require(t.kl_weight >= 0, f"--train.kl-weight must be 0 or more; got {t.kl_weight}.")
    require(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, f"--ema-decay must be between 0 and 1 (e.g. 0.999); got "
                                                            f"{cfg.ema_decay}.")
    reward_terms(cfg.reward_preset, cfg.reward)  # unknown names, bad weights and failing imports, before any model loads
    check_churn(sample)
    check_seed(cfg.seed, "--seed")
    check_run_name(cfg.run_name)
    require(not Path(cfg.runs_dir).is_file(), f"--runs-dir {cfg.runs_dir} is a file; give a folder for the runs.")
    if cfg.resume_from is None:  # a resume writes in its run's folder, or beside it (checked when it is locked)
        check_folder_writable(cfg.runs_dir, "--runs-dir")
    # A method's own settings (--grpo.*, --nft.*) are checked by the method (fdfo/methods/).


def check_churn(sample: SampleConfig) -> None:
    """The interval and prior schedules' settings: weights and widths more than 0 (their logarithms and
    divisions need it), spreads 0 or more."""
    i, p = sample.interval, sample.prior
    for flag, value in [("--sample.interval.churn-weight", i.churn_weight), ("--sample.interval.soft-sigma", i.soft_sigma),
                        ("--sample.prior.churn-weight", p.churn_weight)]:
        require(value > 0, f"{flag} must be more than 0; got {value}.")
    for flag, value in [("--sample.interval.sigma", i.sigma), ("--sample.interval.churn-weight-sigma", i.churn_weight_sigma),
                        ("--sample.prior.churn-weight-sigma", p.churn_weight_sigma)]:
        require(value >= 0, f"{flag} must be 0 or more; got {value}.")


def check_resolution(resolution: int | None, flag: str) -> None:
    require(resolution is None or (resolution >= 16 and resolution % 16 == 0),
            f"{flag} must be a multiple of 16 pixels (the VAE's 8 × the transformer's patch of 2); got {resolution}.")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def check_image_out(out: Path) -> None:
    """An image file we can write: a known extension, a folder we can create and write in."""
    out = Path(out)
    require(out.suffix.lower() in IMAGE_SUFFIXES, f"--out {out}: the extension decides the format; use one of "
                                                   f"{', '.join(IMAGE_SUFFIXES)}.")
    check_writable(out)


def check_writable(out: Path) -> None:
    """`out`'s folder exists (created if need be) and can be written, and `out` is not a folder."""
    out = Path(out)
    require(not out.is_dir(), f"--out {out} is a folder; give a file name.")
    check_folder_writable(out.parent, f"--out {out}: its folder")


def check_generate_config(cfg: GenerateConfig) -> None:
    check_finite(cfg)
    check_seed(cfg.seed, "--seed")
    for flag, value in [("--grid-rows", cfg.grid_rows), ("--grid-cols", cfg.grid_cols), ("--batch-size", cfg.batch_size),
                        ("--num-solver-steps", cfg.num_solver_steps),
                        ("--max-sequence-length", cfg.max_sequence_length)]:
        require(value is None or value >= 1, f"{flag} must be at least 1; got {value}.")
    check_sampling(cfg)
    check_image_out(cfg.out)


def check_sampling(cfg: GenerateConfig | MetricsConfig) -> None:
    """What generate.py and metrics.py share: the image size, the guidance, which weights."""
    check_resolution(cfg.resolution, "--resolution")
    require(cfg.guidance_scale is None or cfg.guidance_scale >= 0, f"--guidance-scale must be 0 or more (1 = no "
                                                                   f"guidance); got {cfg.guidance_scale}.")
    require(not cfg.ema or cfg.checkpoint is not None, "--ema uses a checkpoint's EMA weights: give --checkpoint too.")
    require(not (cfg.ema and cfg.own_weights), "--ema and --own-weights contradict each other: give one.")


def check_export_config(cfg: ExportConfig) -> None:
    require(cfg.checkpoint is not None, "--checkpoint is required: the LoRA checkpoint (or run folder) to export.")
    require(cfg.out is not None, "--out is required: the folder to write the diffusers LoRA into.")
    require(not cfg.out.exists() or cfg.out.is_dir(), f"--out {cfg.out} is a file; give a folder.")
    check_folder_writable(cfg.out, "--out")
    require(cfg.merged or cfg.dtype == "auto", f"--dtype {cfg.dtype} sets the dtype of the merged transformer, which "
            "only --merged writes; add --merged, or leave --dtype out.")


def check_metrics_config(cfg: MetricsConfig) -> None:
    check_finite(cfg)
    check_seed(cfg.prompt_seed, "--prompt-seed", below=2**32)
    check_seed(cfg.image_seed, "--image-seed")
    for flag, value in [("--num-prompts", cfg.num_prompts), ("--num-repeats", cfg.num_repeats),
                        ("--batch-size", cfg.batch_size), ("--num-solver-steps", cfg.num_solver_steps),
                        ("--max-sequence-length", cfg.max_sequence_length)]:
        require(value is None or value >= 1, f"{flag} must be at least 1; got {value}.")
    require("dreamsim_diversity" not in cfg.metrics or cfg.num_repeats >= 2,
            "dreamsim_diversity compares the repeats of a prompt: give --num-repeats 2 or more.")
    check_sampling(cfg)
    if cfg.out is not None:
        check_writable(cfg.out)


def project_path(path: Path) -> Path:
    """A relative path as given if it exists from here, else relative to the project (e.g. prompt_sets/...)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def to_jsonable(cfg: Any) -> dict[str, Any]:
    """A dataclass as a plain dict that json can write (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
