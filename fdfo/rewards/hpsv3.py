"""HPSv3 (Ma et al., 2025; the `hpsv3` package 1.0.0): Qwen2-VL-7B-Instruct, fine-tuned with a reward head, reads
the image at 256 · 28² pixels and the published rating instruction ending in a `<|Reward|>` token; the head maps
that token's last hidden state to (μ, σ), and the score is μ.

The package pins transformers==4.45.2 (ours: 5.x) and imports trl, deepspeed's trainer and more at import time, so
the model is built here from transformers' Qwen2-VL classes and loaded from the published HPSv3.safetensors. As
the package's own forward does, the language model gets no M-RoPE image positions (sequential positions in all
three sections). bench/reward_models_side_by_side.py runs the package's HPSv3RewardInferencer.reward beside this
one on the same weights.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

from fdfo.errors import UserError
from fdfo.hub_files import HubFiles, processor_files

HPSV3 = HubFiles("the hpsv3 scorer's model", "MizzenAI/HPSv3", ("HPSv3.safetensors",))
# The configs and processor the package reads from the base model's repo (not its weights: HPSv3's file is whole).
QWEN2_VL = processor_files("the hpsv3 scorer's processor", "Qwen/Qwen2-VL-7B-Instruct")
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28  # the package's min_pixels = max_pixels
FACTOR = 28  # patch 14 × merge 2
# The published instruction and the rating request after it, verbatim (hpsv3/dataset/data_collator_qwen.py).
# HPSv3.safetensors names its weights as transformers 4.45's Qwen2-VL did (the package pins it): → ours.
LEGACY_NAMES = {r"^model\.(?!language_model\.|visual\.)": "model.language_model.", r"^visual\.": "model.visual."}
PROMPT = (Path(__file__).parent / "hpsv3_prompt.txt").read_text()


class Hpsv3Error(UserError, ValueError):
    """HPSv3.safetensors does not fit the model; the message says which weights."""


class Hpsv3Model(Qwen2VLForConditionalGeneration):
    """Qwen2-VL with HPSv3's reward head (its 'ranknet' head without kwargs: 1024 and 16 hidden units), in float32
    as published. Its weights load from HPSv3.safetensors under the package's names."""

    _keep_in_fp32_modules_strict = ["rm_head"]  # also under bf16, as published

    def __init__(self, config):
        super().__init__(config)
        self.rm_head = nn.Sequential(nn.Linear(config.text_config.hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05),
                                     nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2))
        self.post_init()

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
               image_grid_thw: torch.Tensor, reward_token_id: int) -> torch.Tensor:
        """(μ, σ) at each row's reward token: (B, 2)."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        image = self.model.visual(pixel_values.to(self.model.visual.dtype), grid_thw=image_grid_thw).pooler_output
        mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        rows = input_ids == reward_token_id
        if not torch.equal(rows.sum(1), torch.ones_like(rows.sum(1))):
            raise ValueError(f"every prompt must hold {REWARD_TOKEN} once")
        return self.rm_head(hidden[rows].float())


def smart_resize(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR) -> tuple[int, int]:
    """The package's size for an image: multiples of `factor`, `pixels` in area (min = max), the aspect kept."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def reward_token(processor) -> int:
    """The id of the reward token, added to the tokenizer (as the package adds it) where it lacks it."""
    if REWARD_TOKEN not in processor.tokenizer.get_vocab():
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)


class Hpsv3Score:
    """HPSv3's μ for images against prompts. uint8 images (evaluation) take the package's PIL path (bicubic
    resize to the 256 · 28² size); float images in [0, 1] (training) its tensor path (torchvision's antialiased
    bicubic), then the processor without rescaling."""

    def __init__(self, model: Hpsv3Model, processor, device: torch.device):
        processor.tokenizer.padding_side = "right"  # as the package's processor
        self.reward_token_id = reward_token(processor)
        self.model = model.to(device).eval().requires_grad_(False)
        self.processor, self.device = processor, device

    @classmethod
    def from_pretrained(cls, device: torch.device) -> Hpsv3Score:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with QWEN2_VL.loading():
            base = QWEN2_VL.local()
            processor = AutoProcessor.from_pretrained(base)
            config = AutoConfig.from_pretrained(base)
        reward_token(processor)
        config.text_config.vocab_size = len(processor.tokenizer)  # the package resizes the embeddings to it
        with HPSV3.loading(), tempfile.TemporaryDirectory() as folder:
            # from_pretrained reads a folder of config and weights: HPSv3's file beside the base model's config.
            config.save_pretrained(folder)
            (Path(folder) / "model.safetensors").symlink_to((HPSV3.local() / "HPSv3.safetensors").resolve())
            model, info = Hpsv3Model.from_pretrained(folder, dtype=dtype, key_mapping=LEGACY_NAMES,
                                                     output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            raise Hpsv3Error(f"HPSv3.safetensors does not fit HPSv3's model: missing {sorted(info['missing_keys'])[:5]}, "
                             f"unexpected {sorted(info['unexpected_keys'])[:5]}; is it MizzenAI/HPSv3's file?")
        return cls(model, processor, device)

    def resized(self, images: torch.Tensor) -> list:
        height, width = smart_resize(*images.shape[-2:])
        if images.is_floating_point():
            return list(TF.resize(images.float(), [height, width], InterpolationMode.BICUBIC, antialias=True))
        from PIL import Image
        return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()).resize((width, height), Image.BICUBIC)
                for im in images]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT.format(text_prompt=p)}]}]
                 for p in prompts]
        text = self.processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=text, images=self.resized(images), padding=True, return_tensors="pt",
                                do_rescale=not images.is_floating_point()).to(self.device)
        return self.model.reward(inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.image_grid_thw,
                                 self.reward_token_id)[:, 0]
