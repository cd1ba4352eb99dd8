"""The reward engine: validate images, score every term, weight and sum, refuse non-finite rewards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fdfo.rewards.registry import RewardSpecError, Scorer, Scorers, local_models


@dataclass
class RewardTerm:
    name: str
    weight: float
    scorer: Scorer


@dataclass
class RewardOutput:
    total: torch.Tensor  # (B,) weighted sum, float32
    terms: dict[str, torch.Tensor]  # term name → (B,) unweighted scores

    @staticmethod
    def cat(outputs: list[RewardOutput]) -> RewardOutput:
        """The scores of several batches, in order."""
        return RewardOutput(torch.cat([o.total for o in outputs]),
                            {k: torch.cat([o.terms[k] for o in outputs]) for k in outputs[0].terms})


class Reward:
    """A weighted sum of reward terms."""

    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ValueError("A reward needs at least one term.")
        self.terms = terms

    def local_models(self) -> list[torch.nn.Module]:
        """The networks the terms hold whole on this rank (not sharded): frozen, so they can leave the GPU."""
        return local_models([term.scorer for term in self.terms])

    def __call__(self, images: torch.Tensor, prompts: list[str], differentiable: bool = False) -> RewardOutput:
        """The weighted sum and each term; with `differentiable`, with their gradient w.r.t. `images` (a gradient
        method's loss), else without any."""
        check_images(images, prompts)
        with torch.set_grad_enabled(differentiable):
            scores = {term.name: checked_scores(term.name, term.scorer(images, prompts), len(prompts)).to(images.device)
                      for term in self.terms}  # a user's scorer may answer on the CPU
        for name, values in scores.items():
            if differentiable and values.grad_fn is None:
                raise RewardSpecError(f"The reward term `{name}` returned scores without a gradient (no grad_fn); a "
                                      "gradient method needs a differentiable reward: write the scorer in torch "
                                      "operations on the images, or use another --method.")
        total = sum(term.weight * scores[term.name] for term in self.terms)
        scores = {name: values.detach() for name, values in scores.items()}  # logged; the gradient is the total's
        for name, values in [*scores.items(), ("total", total.detach())]:
            bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
            if bad:
                raise FloatingPointError(
                    f"The reward term `{name}` is {values[bad[0]].item()} for the prompt {prompts[bad[0]]!r}; "
                    "a non-finite reward would poison training, so the run stops here."
                )
        return RewardOutput(total=total, terms=scores)


def checked_scores(name: str, scores: object, count: int) -> torch.Tensor:
    """A scorer's output as a float32 tensor of shape (count,), or an error that says what it returned."""
    if isinstance(scores, torch.Tensor) and scores.shape == (count,) and scores.is_floating_point():
        return scores.float()
    got = (f"a {scores.dtype} tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor)
           else f"a {type(scores).__name__}")
    raise RewardSpecError(f"The reward term `{name}` returned {got}; a scorer must return a float tensor of shape "
                          f"({count},): one number per image.")


def check_images(images: torch.Tensor, prompts: list[str]) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Rewards take images of shape (batch, 3, height, width), got {tuple(images.shape)}.")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"Rewards need one prompt per image: {images.shape[0]} images, {len(prompts)} prompts.")
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError("Rewards take float images with values in [0, 1]; convert uint8 images with x / 255.")


def build_reward(terms: list[tuple[str, float]], scorers: Scorers) -> Reward:
    """The weighted sum of `terms` ((name, weight) pairs, see registry.reward_terms), scorers built by `scorers`.

    With several ranks and a sharded VLM, the VLM's parameters are sharded over the ranks (FSDP2): every
    rank must then score the same number of batches, which the epoch guarantees.
    """
    return Reward([RewardTerm(name, weight, scorers.build(name)) for name, weight in terms])
