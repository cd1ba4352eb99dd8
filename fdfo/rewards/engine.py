"""The reward engine: validate images, score every term, weight and sum, refuse non-finite rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images (B, 3, H, W) in [0, 1], prompts → (B,) float32

# Preset name → (term, weight) list (paper §6; brightness is the offline demo's reward, compressibility DDPO's).
PRESETS: dict[str, list[tuple[str, float]]] = {
    "pickscore": [("pickscore", 1.0)],
    "vlm_alignment": [("vlm_alignment", 1.0)],
    "combined": [("pickscore", 1.0), ("vlm_alignment", 0.1)],
    "brightness": [("brightness", 1.0)],
    "compressibility": [("compressibility", 1.0)],
}


@dataclass
class RewardTerm:
    name: str
    weight: float
    scorer: Scorer


@dataclass
class RewardOutput:
    total: torch.Tensor  # (B,) weighted sum, float32
    terms: dict[str, torch.Tensor]  # term name → (B,) unweighted scores


class Reward:
    """A weighted sum of reward terms."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ValueError("A reward needs at least one term.")
        self.terms = terms

    def local_models(self) -> list[torch.nn.Module]:
        """The networks the terms hold whole on this rank (not sharded): frozen, so they can leave the GPU."""
        return [term.scorer.model for term in self.terms
                if isinstance(getattr(term.scorer, "model", None), torch.nn.Module)
                and not getattr(term.scorer, "sharded", False)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        check_images(images, prompts)
        scores = {term.name: term.scorer(images, prompts).float() for term in self.terms}
        total = sum(term.weight * scores[term.name] for term in self.terms)
        for name, values in [*scores.items(), ("total", total)]:
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            if bad:
                raise FloatingPointError(
                    f"The reward term `{name}` is {values[bad[0]].item()} for the prompt {prompts[bad[0]]!r}; "
                    "a non-finite reward would poison training, so the run stops here."
                )
        return RewardOutput(total=total, terms=scores)


def check_images(images: torch.Tensor, prompts: list[str]) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Rewards take images of shape (batch, 3, height, width), got {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"Rewards need one prompt per image: {images.shape[0]} images, {len(prompts)} prompts.")
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError("Rewards take float images with values in [0, 1]; convert uint8 images with x / 255.")


def build_scorer(name: str, device: torch.device, twins: str | None, vlm_model_name: str, shard_vlm: bool,
                 vlm_buffers: str = "bf16") -> Scorer:
    """The scorer of a reward term. `twins`: None = the real models; "tiny" = tiny random twins (offline
    tests); "full" = random weights with the real shapes (GPU benchmarks). `vlm_buffers`: the dtype of the
    VLM's rotary frequencies, "bf16" as in the published training reward or "fp32"."""
    if name == "brightness":
        from fdfo.rewards.brightness import brightness
        return brightness
    if name == "compressibility":
        from fdfo.rewards.compressibility import Compressibility
        return Compressibility()
    if name == "pickscore":
        from fdfo.rewards.clip_score import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, ClipScore
        from fdfo.rewards.twins import random_clip
        if twins:
            return ClipScore(*random_clip(size=twins, device=device), device)
        return ClipScore.from_pretrained(PICKSCORE_MODEL, PICKSCORE_PROCESSOR, device)
    if name == "vlm_alignment":
        from fdfo.rewards.twins import vlm_twin
        from fdfo.rewards.vlm import YesNoVlm
        buffer_dtype = {"bf16": torch.bfloat16, "fp32": None}[vlm_buffers]
        if twins:
            vlm = YesNoVlm(*vlm_twin(twins, device), device, shard=shard_vlm, buffer_dtype=buffer_dtype)
        else:
            vlm = YesNoVlm.from_pretrained(vlm_model_name, device, shard=shard_vlm, buffer_dtype=buffer_dtype)
        return VlmAlignment(vlm)
    raise ValueError(f"Unknown reward term `{name}`; valid terms are: {', '.join(sorted(valid_terms()))}.")


class VlmAlignment:
    """The paper's VLM term: P(yes) to "does this image show <prompt>?" at 504 px."""

    def __init__(self, vlm):
        self.vlm, self.model, self.sharded = vlm, vlm.model, vlm.sharded

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from fdfo.rewards.vlm import TRAIN_QUESTION
        return self.vlm.score(images, [TRAIN_QUESTION.format(prompt=p) for p in prompts], resize=504)


def valid_terms() -> set[str]:
    return {name for terms in PRESETS.values() for name, _ in terms}


def build_reward(preset: str, device: torch.device, twins: str | None = None, vlm_model_name: str = "qwenvl-7b",
                 shard_vlm: bool = True, vlm_buffers: str = "bf16") -> Reward:
    """The reward of a preset; `twins` ("tiny" or "full") swaps model-based terms for random-weight twins.

    With several ranks and `shard_vlm`, the VLM's parameters are sharded over the ranks (FSDP2): every
    rank must then score the same number of batches, which the epoch guarantees.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown reward preset `{preset}`; valid presets are: {', '.join(PRESETS)}.")
    return Reward([RewardTerm(name, weight, build_scorer(name, device, twins, vlm_model_name, shard_vlm, vlm_buffers))
                   for name, weight in PRESETS[preset]])
