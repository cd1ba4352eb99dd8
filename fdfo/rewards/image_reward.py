"""ImageReward (Xu et al., 2023; the `image-reward` package 1.5): BLIP's ViT reads the image at 224 px, a BERT
encoder cross-attends from the prompt (35 tokens) to it, and five linear layers — no activations between them,
as published — map the first token's state to a reward, normalised by the published mean and std.

The package pins timm==0.6.13 and fairscale==0.4.13, and its BLIP code imports transformers functions that
transformers 5 no longer has: the model is built here from transformers' own BLIP classes and loaded from the
published ImageReward.pt, whose (BLIP) key names are mapped below. bench/reward_models_side_by_side.py runs the
package's own ImageReward.score beside this one on the same weights.
"""

from __future__ import annotations

import json
import re

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from fdfo.errors import UserError
from fdfo.hub_files import HubFiles, processor_files

IMAGE_REWARD = HubFiles("the image_reward scorer's model", "THUDM/ImageReward", ("ImageReward.pt", "med_config.json"))
# The package's tokenizer is bert-base-uncased's (with two special tokens a prompt never holds).
BERT_TOKENIZER = processor_files("the image_reward scorer's tokenizer", "google-bert/bert-base-uncased")
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the published normalisation of the head's output
IMAGE_SIZE, MAX_TOKENS = 224, 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
VIT_HEAD_DIM = 64  # BLIP's ViTs (B/16: 12 heads of 768; L/16: 16 of 1024); the weights do not record it

# ImageReward.pt's names → ours, by prefix ({} a layer's number). The ViT is timm's layout; the text encoder's
# names are BERT's in both.
KEY_MAP = [
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{}.norm1.", "vision.encoder.layers.{}.layer_norm1."),
    ("blip.visual_encoder.blocks.{}.norm2.", "vision.encoder.layers.{}.layer_norm2."),
    ("blip.visual_encoder.blocks.{}.attn.qkv.", "vision.encoder.layers.{}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{}.attn.proj.", "vision.encoder.layers.{}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{}.mlp.", "vision.encoder.layers.{}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    *[(f"mlp.layers.{published}.", f"head.{ours}.") for ours, published in enumerate((0, 2, 4, 6, 7))],
]
UNUSED = re.compile(r"blip\.(vision_proj|text_proj)\.|.*position_ids$")  # the ITC projections; a buffer


class ImageRewardError(UserError, ValueError):
    """ImageReward.pt is not the published file's layout; the message says which weight."""


def renamed(key: str, pairs: list[tuple[str, str]]) -> str | None:
    """`key` with the first matching prefix of `pairs` (from, to) replaced; None if none matches."""
    for source, target in pairs:
        match = re.match(re.escape(source).replace(r"\{\}", r"(\d+)"), key)
        if match is not None:
            return target.format(*match.groups()) + key[match.end():]
    return None


def our_key(published: str) -> str | None:
    """Our name of a weight of ImageReward.pt; None for one the score does not use."""
    if UNUSED.match(published):
        return None
    ours = renamed(published, KEY_MAP)
    if ours is None:
        raise ImageRewardError(f"ImageReward.pt holds `{published}`, which ImageReward's model does not have; is it "
                               "THUDM/ImageReward's file?")
    return ours


def vision_config(weights: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The ViT's shape, read from its weights (the package builds ViT-L/16 at 224 px)."""
    hidden = weights["blip.visual_encoder.cls_token"].shape[-1]
    patch = weights["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    positions = weights["blip.visual_encoder.pos_embed"].shape[1]
    depth = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    return BlipVisionConfig(hidden_size=hidden, intermediate_size=weights["blip.visual_encoder.blocks.0.mlp.fc1.weight"]
                            .shape[0], num_hidden_layers=depth, num_attention_heads=hidden // VIT_HEAD_DIM,
                            patch_size=patch, image_size=round((positions - 1) ** 0.5) * patch, layer_norm_eps=1e-6,
                            hidden_act="gelu")


def text_config(med_config: dict, encoder_width: int) -> BlipTextConfig:
    """The text encoder of the package's med_config.json (BERT's fields), cross-attending to `encoder_width`."""
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    return BlipTextConfig(**{f: med_config[f] for f in fields}, encoder_hidden_size=encoder_width,
                          bos_token_id=None, sep_token_id=None,  # BERT's ids, not read by the encoder
                          is_decoder=True)  # transformers' BLIP builds cross-attention for decoders only


class ImageRewardModel(nn.Module):
    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size, *HEAD_WIDTHS)
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))  # dropout only, no activations

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state
        state = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                          encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
                          is_decoder=False).last_hidden_state[:, 0]  # bidirectional, as BLIP's encoder
        return (self.head(state.float()).squeeze(-1) - MEAN) / STD


def load_published(weights: dict[str, torch.Tensor], med_config: dict) -> ImageRewardModel:
    """Our model holding the weights of ImageReward.pt, every weight it needs found there."""
    vision = vision_config(weights)
    model = ImageRewardModel(vision, text_config(med_config, vision.hidden_size))
    state = {ours: value for key, value in weights.items() if (ours := our_key(key)) is not None}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ImageRewardError(f"ImageReward.pt does not fit ImageReward's model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}.")
    return model


def published_weights(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """`model`'s weights under ImageReward.pt's names (a random twin laid out as the published file)."""
    inverse = [(ours, published) for published, ours in KEY_MAP]
    return {renamed(key, inverse): value for key, value in model.state_dict().items() if not UNUSED.match(key)}


class ImageRewardScore:
    """ImageReward's score of images against prompts. uint8 images (evaluation) take the package's path, PIL's
    bicubic resize to 224 px and a centre crop; float images in [0, 1] (training) the same operations in
    torchvision, differentiable (antialiased bicubic: within rounding of PIL's)."""

    def __init__(self, model: ImageRewardModel, tokenizer, device: torch.device):
        self.model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer, self.device = tokenizer, device

    @classmethod
    def from_pretrained(cls, device: torch.device) -> ImageRewardScore:
        with IMAGE_REWARD.loading():
            folder = IMAGE_REWARD.local()
            weights = torch.load(folder / "ImageReward.pt", map_location="cpu", weights_only=True)
            med_config = json.loads((folder / "med_config.json").read_text())
        with BERT_TOKENIZER.loading():
            tokenizer = BertTokenizer.from_pretrained(BERT_TOKENIZER.local())
        return cls(load_published(weights, med_config), tokenizer, device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            images = TF.resize(images.float(), IMAGE_SIZE, InterpolationMode.BICUBIC, antialias=True)
        else:
            from PIL import Image
            images = torch.stack([TF.to_tensor(TF.resize(Image.fromarray(im.permute(1, 2, 0).cpu().numpy()), IMAGE_SIZE,
                                                         InterpolationMode.BICUBIC)) for im in images])
        return TF.normalize(TF.center_crop(images, IMAGE_SIZE), CLIP_MEAN, CLIP_STD).to(self.device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(self.device)
        return self.model(self.pixels(images), text.input_ids, text.attention_mask)
