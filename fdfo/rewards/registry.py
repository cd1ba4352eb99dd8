"""Every scorer fdfo knows, by name, built one way for training rewards and evaluation metrics alike.

A scorer maps float images in [0, 1] (or uint8 images, in evaluation) and their prompts to one float
per image. Besides the built-in names, a training term may name the user's own scorer as
`package.module:callable`.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

import fdfo
from fdfo.errors import UserError
from fdfo.hub_files import HubFiles, merged_files, model_files, processor_files

Scorer = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images (B, 3, H, W), prompts → (B,) float

# Preset name → (term, weight) list (paper §6; brightness is the offline demo's reward, compressibility DDPO's).
PRESETS: dict[str, list[tuple[str, float]]] = {
    "pickscore": [("pickscore", 1.0)],
    "vlm_alignment": [("vlm_alignment", 1.0)],
    "combined": [("pickscore", 1.0), ("vlm_alignment", 0.1)],
    "brightness": [("brightness", 1.0)],
    "compressibility": [("compressibility", 1.0)],
}
# CLIP-type scorers: (model, processor for training, processor for evaluation), each as published; the score
# is logit_scale.exp() · cosine for all. The twin seed gives each random stand-in its own weights.
CLIP_SCORERS = {
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "yuvalkirstain/PickScore_v1"),
    "hpsv2": ("adams-story/HPSv2-hf", "adams-story/HPSv2-hf", "adams-story/HPSv2-hf"),
    "clip_h14": ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",) * 3,
    "clip_l14": ("openai/clip-vit-large-patch14",) * 3,
}
# VLM yes/no questions. The published training reward asks its own alignment question of images resized to
# 504 px; the published evaluation asks these of the images as generated.
VLM_QUESTIONS = {
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}
TRAIN_VLM_RESIZE = 504
# Preference models of their own architecture: ImageReward (BLIP) and HPSv3 (Qwen2-VL).
PREFERENCE_MODELS = ("image_reward", "hpsv3")
SCORER_NAMES = ("brightness", "compressibility", *CLIP_SCORERS, *PREFERENCE_MODELS, *VLM_QUESTIONS)
# Scores without a gradient w.r.t. the image: a JPEG's size, and a VLM's answer to a question about a resized image.
# HPSv3's score goes through Qwen2-VL's image processor, whose patching is not kept differentiable here.
NOT_DIFFERENTIABLE = ("compressibility", "hpsv3", *VLM_QUESTIONS)
# The reward models that go with a random base model: tiny twins, or full-size random weights.
TWINS = {"tiny": "tiny", "tiny-flux": "tiny", "sd35m-random": "full", "sd35l-random": "full", "flux-random": "full"}


class RewardSpecError(UserError, ValueError):
    """A reward term that cannot be used; the message says which and what to write instead."""


def twins_for(pretrained_model: str) -> str | None:
    """None (the real reward models) for a real base model; "tiny" or "full" random twins for a random one."""
    return TWINS.get(pretrained_model)


def parse_terms(specs: tuple[str, ...]) -> list[tuple[str, float]]:
    """`NAME=WEIGHT` strings (the weight defaults to 1) → (name, weight) pairs, every name checked."""
    terms = []
    for spec in specs:
        name, _, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise RewardSpecError(f"--reward {spec}: the weight `{weight}` is not a finite number; write NAME=WEIGHT, "
                                  "e.g. pickscore=1.")
        check_term(name)
        terms.append((name, value))
    names = [name for name, _ in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RewardSpecError(f"--reward names {', '.join(duplicates)} more than once; give each term once.")
    return terms


def reward_terms(preset: str, specs: tuple[str, ...]) -> list[tuple[str, float]]:
    """The run's (term, weight) list: the terms of `--reward` if given, else the preset's."""
    if specs:
        return parse_terms(specs)
    if preset not in PRESETS:
        raise RewardSpecError(f"Unknown reward preset `{preset}`; valid presets are: {', '.join(PRESETS)}.")
    return PRESETS[preset]


def check_differentiable(terms: list[tuple[str, float]], method: str) -> None:
    """A gradient method's reward terms must have a gradient (a user's scorer is checked at its first call)."""
    for name, _ in terms:
        if name in NOT_DIFFERENTIABLE:
            raise RewardSpecError(f"The reward term `{name}` has no gradient w.r.t. the image, and --method {method} "
                                  "back-propagates the reward: use differentiable terms (brightness, "
                                  f"{', '.join(CLIP_SCORERS)}, image_reward) or another --method.")


def check_term(name: str) -> None:
    """A built-in name, or `module:callable` that imports and is callable."""
    if ":" in name:
        custom_scorer(name)
    elif name not in SCORER_NAMES:
        raise RewardSpecError(f"Unknown reward term `{name}`; known terms are: {', '.join(SCORER_NAMES)}; or name "
                              "your own scorer as package.module:function.")


def custom_scorer(name: str) -> Scorer:
    """The user's scorer `module:attribute` (the module imported from the working folder or PYTHONPATH), wrapped
    so that an error it raises names the term."""
    module_name, _, attribute = name.partition(":")
    module = import_user_module(name, module_name)
    scorer = getattr(module, attribute, None)
    if not callable(scorer):
        raise RewardSpecError(f"Reward term `{name}`: `{module_name}` has no function `{attribute}`"
                              + ("" if scorer is None else f" (it is a {type(scorer).__name__})") + ".")
    return UserScorer(name, scorer)


def import_user_module(term: str, module_name: str):
    """The module of the reward term `term`; whatever its import raises (an error, or sys.exit) is refused in a
    sentence naming the module (Ctrl-C still stops the program)."""
    try:
        with working_folder_first():
            return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:  # else the program would end here, silently, with the module's exit code
        raise RewardSpecError(f"Reward term `{term}`: importing `{module_name}` called sys.exit (exit code "
                              f"{e.code!r}); a scorer's module must not exit when it is imported: put that code under "
                              "`if __name__ == \"__main__\":`." + user_traceback(e)) from e
    except BaseException as e:  # an import error, or any error the module raises while it loads
        where = (f" It was looked for in the working folder {os.getcwd()} and on PYTHONPATH."
                 if is_missing(module_name, e) else user_traceback(e))
        raise RewardSpecError(f"Reward term `{term}`: importing `{module_name}` failed ({type(e).__name__}: "
                              f"{e}).{where}") from e


def is_missing(module_name: str, error: BaseException) -> bool:
    """Whether `error` says that the module itself (or its package) is not found, not a module it imports."""
    return isinstance(error, ModuleNotFoundError) and f"{module_name}.".startswith(f"{error.name}.")


@contextlib.contextmanager
def working_folder_first() -> Iterator[None]:
    """The working folder first on sys.path, for this block only: a module there is found however the program
    was started (`python path/to/train.py` puts the script's folder there, not the working folder), and no
    library the process imports later can be shadowed by a file of the same name in the working folder."""
    folder = os.getcwd()
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path.remove(folder)


class UserScorer:
    """The user's scorer, named as its reward term `module:function`: an error it raises (a bug in the user's
    code) stops the run in a sentence naming the term, with the traceback of the user's code."""

    def __init__(self, name: str, function: Scorer):
        self.name, self.function = name, function

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            return self.function(images, prompts)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: the run would end silently
            raise RewardSpecError(f"The reward term `{self.name}` raised {type(e).__name__}: {e}; fix the scorer and "
                                  "run again." + user_traceback(e)) from e


# Frames of these are not the user's: fdfo's own, and importlib's (which imports the user's module).
NOT_USER_CODE = (Path(fdfo.__file__).resolve().parent, Path(importlib.__file__).resolve().parent)


def user_traceback(error: BaseException) -> str:
    """The frames of `error`'s traceback outside fdfo and importlib, as Python prints them: the user's code and
    what it called ("" if none)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith("<frozen importlib")
              and not any(Path(frame.filename).resolve().is_relative_to(folder) for folder in NOT_USER_CODE)]
    if not frames:
        return ""
    return "\nTraceback of the scorer's code (most recent call last):\n" + "".join(traceback.format_list(frames)).rstrip()


def clip_files(name: str, purpose: Literal["reward", "metric"]) -> tuple[HubFiles, HubFiles]:
    """The Hub files of the CLIP-type scorer `name`: its model, and the processor `purpose` takes."""
    model, train_processor, eval_processor = CLIP_SCORERS[name]
    processor = train_processor if purpose == "reward" else eval_processor
    return model_files(f"the {name} scorer's model", model), processor_files(f"the {name} scorer's processor", processor)


def scorer_files(names: tuple[str, ...] | list[str], purpose: Literal["reward", "metric"],
                 vlm_model_name: str) -> list[HubFiles]:
    """What the scorers `names` read from the Hub (each repo's files once; the user's own scorers: nothing known)."""
    from fdfo.rewards.vlm import vlm_files
    wanted = []
    for name in names:
        if name in CLIP_SCORERS:
            wanted += clip_files(name, purpose)
        elif name == "image_reward":
            from fdfo.rewards.image_reward import BERT_TOKENIZER, IMAGE_REWARD
            wanted += [IMAGE_REWARD, BERT_TOKENIZER]
        elif name == "hpsv3":
            from fdfo.rewards.hpsv3 import HPSV3, QWEN2_VL
            wanted += [HPSV3, QWEN2_VL]
        elif name in VLM_QUESTIONS:
            wanted.append(vlm_files(vlm_model_name))
    return merged_files(wanted)


def local_models(scorers: list[Scorer]) -> list[torch.nn.Module]:
    """The networks `scorers` hold whole on this rank (not sharded), each once: frozen, so they can leave the GPU."""
    models = [scorer.model for scorer in scorers if isinstance(getattr(scorer, "model", None), torch.nn.Module)
              and not getattr(scorer, "sharded", False)]
    return list({id(m): m for m in models}.values())  # the VLM questions share one VLM


@dataclass
class Scorers:
    """Builds scorers by name, each model loaded once (the VLM questions share one VLM).

    `purpose` picks the published settings: "reward" as the training reward (PickScore's CLIP-H processor,
    the VLM's own alignment question at 504 px with bf16 rotary buffers, sharded over the ranks if
    `shard_vlm`), "metric" as the evaluation. `twins` ("tiny" or "full"): random-weight stand-ins.
    """

    device: torch.device
    twins: str | None
    purpose: Literal["reward", "metric"]
    vlm_model_name: str = "qwenvl-7b"
    shard_vlm: bool = False
    vlm_buffers: str = "bf16"
    _vlm: Any = field(default=None, repr=False)

    def build(self, name: str) -> Scorer:
        check_term(name)
        if ":" in name:
            return custom_scorer(name)
        if name == "brightness":
            from fdfo.rewards.brightness import brightness
            return brightness
        if name == "compressibility":
            from fdfo.rewards.compressibility import Compressibility
            return Compressibility()
        if name in CLIP_SCORERS:
            return self.clip(name)
        if name == "image_reward":
            return self.image_reward()
        if name == "hpsv3":
            return self.hpsv3()
        return VlmQuestion(self.vlm(), name, self.purpose)

    def clip(self, name: str):
        from fdfo.rewards.clip_score import ClipScore
        from fdfo.rewards.twins import random_clip
        if self.twins:
            return ClipScore(*random_clip(seed=list(CLIP_SCORERS).index(name), size=self.twins, device=self.device),
                             self.device)
        return ClipScore.from_pretrained(*clip_files(name, self.purpose), self.device)

    def image_reward(self):
        from fdfo.rewards.image_reward import ImageRewardScore
        from fdfo.rewards.twins import random_image_reward
        if self.twins:
            model, tokenizer, _ = random_image_reward(size=self.twins, device=self.device)
            return ImageRewardScore(model, tokenizer, self.device)
        return ImageRewardScore.from_pretrained(self.device)

    def hpsv3(self):
        from fdfo.rewards.hpsv3 import Hpsv3Score
        from fdfo.rewards.twins import random_hpsv3
        if self.twins:
            full = self.twins == "full"
            return Hpsv3Score(*random_hpsv3(size="7b" if full else "tiny", device=self.device,
                                            dtype=torch.bfloat16 if full else torch.float32), self.device)
        return Hpsv3Score.from_pretrained(self.device)

    def vlm(self):
        from fdfo.rewards.twins import vlm_twin
        from fdfo.rewards.vlm import YesNoVlm
        if self._vlm is None:
            training = self.purpose == "reward"
            buffer_dtype = torch.bfloat16 if training and self.vlm_buffers == "bf16" else None
            shard = training and self.shard_vlm
            self._vlm = (YesNoVlm(*vlm_twin(self.twins, self.device), self.device, shard=shard, buffer_dtype=buffer_dtype)
                         if self.twins else
                         YesNoVlm.from_pretrained(self.vlm_model_name, self.device, shard=shard, buffer_dtype=buffer_dtype))
        return self._vlm


class VlmQuestion:
    """A VLM yes/no score; the training reward's alignment question is the published reward's own."""

    def __init__(self, vlm, name: str, purpose: str):
        from fdfo.rewards.vlm import TRAIN_QUESTION
        self.vlm, self.model, self.sharded = vlm, vlm.model, vlm.sharded
        training_alignment = purpose == "reward" and name == "vlm_alignment"
        self.question = TRAIN_QUESTION if training_alignment else VLM_QUESTIONS[name]
        self.resize = TRAIN_VLM_RESIZE if purpose == "reward" else None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.vlm.score(images, [self.question.format(prompt=p) for p in prompts], resize=self.resize)
