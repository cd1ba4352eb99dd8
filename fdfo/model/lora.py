"""The LoRA on the transformer's attention projections: attach, save, and load strictly (a damaged or foreign
folder refused before anything loads: fdfo/model/lora_folder.py; non-finite weights when read); copies of its
weights (the EMA, a method's own) swapped in, saved and loaded as LoRA folders of the same format."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from fdfo.model.lora_folder import ADAPTER_FILES, LoraLoadError, check_lora_folder

# The attention projections of every block, as PEFT name suffixes: the published SD3 LoRA's (each backbone says
# what they reach in it: Backbone.lora_targets).
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def lora_config(rank: int = 32, alpha: int = 64, targets: tuple[str, ...] = LORA_TARGETS) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))


def attach_lora(transformer: torch.nn.Module, rank: int = 32, alpha: int = 64, seed: int = 0,
                targets: tuple[str, ...] = LORA_TARGETS) -> PeftModel:
    """Wrap `transformer` in a PEFT LoRA (A gaussian, B zero) whose weights are float32 on any base dtype.

    The LoRA layers are injected into `transformer` itself, so callers holding the bare transformer
    (e.g. the diffusers pipeline) run it with the adapter active.
    """
    device = next(transformer.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = get_peft_model(transformer, lora_config(rank, alpha, targets))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_lora(model: PeftModel, folder: Path) -> None:
    """PEFT's own folder format (adapter_config.json + adapter_model.safetensors), as the published checkpoints."""
    model.save_pretrained(str(folder))


def attach_lora_from(transformer: torch.nn.Module, folder: Path) -> PeftModel:
    """Attach a LoRA shaped by a checkpoint's own adapter_config.json, then load its weights strictly."""
    check_lora_folder(folder)
    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = False
    try:
        model = get_peft_model(transformer, config)
    except ValueError as e:  # PEFT: a target module the transformer lacks
        raise LoraLoadError(f"The LoRA in {folder} does not fit this model ({e}). Check that it was trained on the "
                            "same base model (--pretrained-model).") from None
    load_lora(model, folder)
    return model


def load_lora(model: PeftModel, folder: Path) -> None:
    """Load a PEFT LoRA folder into `model`, refusing any missing, unexpected, reshaped or non-finite weight."""
    folder = Path(folder)
    check_lora_folder(folder)
    state = load_lora_weights(folder)
    expected = get_peft_model_state_dict(model)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        problems = [f"{len(missing)} weights missing ({some(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                    f"{len(reshaped)} of another shape ({some(reshaped)})" if reshaped else ""]
        raise LoraLoadError(
            f"The LoRA in {folder} does not fit this model: {'; '.join(p for p in problems if p)}. "
            "Check that it was trained on the same base model (--pretrained-model) with the same --lora-rank."
        )
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise LoraLoadError(f"The LoRA in {folder} has weights PEFT could not place: {result.unexpected_keys[:3]}.")


def load_lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of the LoRA folder `folder` (checked by check_lora_folder), refused where any is NaN or ±inf:
    a diverged run's checkpoint would turn every image into noise."""
    state = load_file(Path(folder) / ADAPTER_FILES[1])
    non_finite = {key: int((~torch.isfinite(value)).sum()) for key, value in state.items()}
    non_finite = {key: count for key, count in non_finite.items() if count}
    if non_finite:
        count = sum(non_finite.values())
        raise LoraLoadError(f"The LoRA in {folder} holds {count} non-finite value{'s' * (count != 1)} (in "
                            f"{len(non_finite)} of its tensors, e.g. {next(iter(non_finite))}): it cannot be used; "
                            "pick an earlier checkpoint.")
    return state


def trainable(lora: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in lora.parameters() if p.requires_grad]


@contextlib.contextmanager
def swapped_in(lora: PeftModel, weights: list[torch.Tensor]) -> Iterator[None]:
    """The LoRA runs with `weights` (one per trainable parameter) inside the block, with its own after it."""
    params = trainable(lora)
    current = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        yield
    finally:
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(c)


def save_lora_copy(lora: PeftModel, weights: list[torch.Tensor], folder: Path) -> None:
    """`weights` (one per trainable LoRA parameter) as a PEFT LoRA folder."""
    with swapped_in(lora, weights):
        save_lora(lora, folder)


def load_lora_copy(lora: PeftModel, folder: Path) -> list[torch.Tensor]:
    """The weights of the LoRA folder `folder`, one per trainable parameter; the LoRA itself is left as it was."""
    with swapped_in(lora, trainable(lora)):
        load_lora(lora, folder)
        return [p.detach().clone() for p in trainable(lora)]
