"""Typed configuration of the three entry points. Defaults are the paper's (SPEC §5)."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tyro

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY_PRESET = PROJECT_ROOT / "configs" / "tiny.toml"  # applied first for --pretrained-model tiny

RewardPreset = Literal["combined", "pickscore", "vlm_alignment", "brightness", "compressibility"]
VlmName = Literal["qwenvl-7b", "qwenvl-3b"]
TrainPrecision = Literal["auto", "fp16", "bf16", "fp32"]
EvalPrecision = Literal["auto", "bf16", "fp32"]
CompileMode = Literal["auto", "always", "never"]


class ConfigError(ValueError):
    """A configuration the run cannot use; the message says which flag to change."""


@dataclass(frozen=True)
class SampleConfig:
    """How pairs of trajectories are sampled."""

    num_solver_steps: int = 40  # Euler steps per trajectory (T)
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1.0 = no CFG
    churn_weight: float = 0.0025  # churn strength γ of the initial perturbation and of every step but the last
    batch_size: int | None = None  # pairs per sampling batch on each rank; None = derived from the pairs per rank
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    max_sequence_length: int = 128  # T5 tokens of the prompt


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


@dataclass(frozen=True)
class TrainConfig:
    """FDFO training run: `python train.py` or `torchrun --nproc_per_node=N train.py`."""

    config: Path | None = None  # TOML file of settings (see configs/); flags given on the command line win
    pretrained_model: str = SD35_MEDIUM  # Hub id or local diffusers folder; `tiny` (offline CPU demo) or `sd35m-random` (real shapes, random weights)
    reward_preset: RewardPreset = "combined"  # reward terms and weights
    vlm_model_name: VlmName = "qwenvl-7b"  # Qwen2.5-VL size used by the VLM reward
    vlm_use_fsdp: tyro.conf.FlagConversionOff[bool] = True  # shard the VLM's parameters over the ranks (False: a full copy per rank)
    vlm_buffers: Literal["bf16", "fp32"] = "bf16"  # dtype of the VLM's rotary frequencies: bf16 as the published reward's FSDP1 mixed precision leaves them; fp32 exact
    num_epochs: int = 1000  # epochs to train (results are good around 100)
    total_pairs_per_epoch: int = 432  # pairs sampled per epoch over all ranks (2 reward evaluations each)
    gradient_steps_per_epoch: int = 4  # optimiser steps per epoch
    max_batch_size: int | None = None  # cap on derived batch sizes; None = 6 below 8 ranks, else 13
    lora_rank: int = 32  # LoRA rank r
    lora_alpha: int = 64  # LoRA alpha (scale alpha / r)
    seed: int = 6  # seed of prompts, noise, shuffles and LoRA init
    save_freq: int = 5  # write a checkpoint every this many epochs
    run_name: str | None = None  # run folder suffix; None = `<reward_preset>-cfg_<guidance with . as p>`
    runs_dir: Path = Path("runs")  # parent of the run folders `<5-digit id>-<run name>/`
    resume_from: Path | None = None  # checkpoint folder, or run folder (= its newest checkpoint), to continue exactly
    prompt_file: Path = Path("prompt_sets/pickscore_train.txt")  # training prompts, one a line
    log_wandb: bool = False  # also log to Weights & Biases
    memory_efficient: bool = True  # move the text encoders to the CPU while training
    precision: TrainPrecision = "auto"  # numerics of sampling and training alike: fp16 = the published recipe (fp16 autocast over bf16 weights, fp32 LoRA, gradient scaler); bf16 autocast; fp32; auto = fp16 on GPU, fp32 on CPU
    compile: CompileMode = "auto"  # torch.compile each transformer block (sampling and training alike); auto = on GPU only
    dry_run: bool = False  # print the resolved configuration and stop before loading any model
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)

    @property
    def default_run_name(self) -> str:
        return f"{self.reward_preset}-cfg_{str(float(self.sample.guidance_scale)).replace('.', 'p')}"


@dataclass(frozen=True)
class GenerateConfig:
    """Image grids from a checkpoint: `python generate.py --checkpoint CKPT --out out.jpg`."""

    config: Path | None = None  # TOML file of settings; flags given on the command line win
    checkpoint: str | None = None  # local folder, run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL; None = base model
    out: Path = Path("out.jpg")  # output image (JPEG quality 95; PNG by extension)
    prompts: Path | None = None  # prompt file, one a line; None = prompt_sets/generate_default.txt
    pretrained_model: str = SD35_MEDIUM  # base model: Hub id, local folder, `tiny` or `sd35m-random`
    grid_rows: int = 2  # image rows per prompt
    grid_cols: int = 2  # image columns per prompt
    seed: int = 0  # seed of the first image; image i of the grid (prompt-major) uses seed + i, as published
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    num_solver_steps: int = 40  # Euler steps
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1.0 = no CFG
    batch_size: int = 4  # images per forward batch
    max_sequence_length: int = 256  # T5 tokens of the prompt (the pipeline's default, as published; training uses 128)
    precision: EvalPrecision = "auto"  # dtype of the plain pipeline; auto = bf16 on GPU (as published), fp32 on CPU


MetricName = Literal[
    "pickscore", "hpsv2", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality", "vlm_photo", "dreamsim_diversity"
]
PromptSetName = Literal["pickscore_train", "hpdv2"]


@dataclass(frozen=True)
class MetricsConfig:
    """The paper's evaluation metrics: `torchrun --nproc_per_node=N metrics.py --checkpoint CKPT ...`."""

    config: Path | None = None  # TOML file of settings; flags given on the command line win
    checkpoint: str | None = None  # local folder, run folder, `hf:<org>/<repo>/<subdir>` or a Hub tree URL; None = base model
    prompt_set: PromptSetName = "hpdv2"  # prompts to evaluate on
    num_prompts: int = 500  # prompts kept after shuffling (capped at the set's size)
    num_repeats: int = 1  # images per prompt (dreamsim_diversity needs ≥ 2)
    metrics: tuple[MetricName, ...] = ("pickscore",)  # metrics to compute
    prompt_seed: int = 0  # seed of the prompt shuffle
    image_seed: int = 0  # image seeds are image_seed + prompt_index · num_repeats + repeat
    pretrained_model: str = SD35_MEDIUM  # base model: Hub id, local folder, `tiny` or `sd35m-random`
    vlm_model_name: VlmName = "qwenvl-7b"  # Qwen2.5-VL size used by the VLM metrics
    resolution: int | None = None  # image side in pixels; None = the paper's 512 (64 for the tiny model)
    num_solver_steps: int = 40  # Euler steps
    guidance_scale: float = 1.0  # classifier-free guidance weight; 1.0 = no CFG
    batch_size: int = 4  # images per forward batch
    max_sequence_length: int = 256  # T5 tokens of the prompt (the pipeline's default, as published; training uses 128)
    out: Path | None = None  # JSON file for the results, with the config and elapsed time
    precision: EvalPrecision = "auto"  # dtype of the plain pipeline; auto = bf16 on GPU (as published), fp32 on CPU


def with_overrides(instance: Any, overrides: dict[str, Any], where: str) -> Any:
    """`instance` with the fields named in `overrides` replaced; nested dataclasses take nested tables."""
    fields = {f.name: f for f in dataclasses.fields(instance)}
    changes = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"{where}: unknown setting `{key}`; valid settings are: {', '.join(sorted(fields))}.")
        current = getattr(instance, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: `{key}` is a section; write it as a [{key}] table.")
            value = with_overrides(current, value, f"{where} [{key}]")
        elif isinstance(current, Path) or (current is None and "Path" in str(fields[name].type)):
            value = Path(value)
        elif isinstance(current, tuple):
            value = tuple(value)
        changes[name] = value
    return dataclasses.replace(instance, **changes)


def read_toml(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"Config file {path} does not exist; the paper's runs are in configs/ (e.g. configs/pickscore.toml).")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"Config file {path} is not valid TOML: {e}") from None


def load_config_file(cls: type, path: Path, base: Any = None) -> Any:
    """`base` (default: `cls()`) with the settings of a TOML file applied."""
    base = cls() if base is None else base
    return with_overrides(dataclasses.replace(base, config=Path(path)), read_toml(path), str(path))


def project_path(path: Path) -> Path:
    """A relative path as given if it exists from here, else relative to the project (e.g. prompt_sets/...)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


def to_jsonable(cfg: Any) -> dict[str, Any]:
    """A dataclass as a plain dict that json can write (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
