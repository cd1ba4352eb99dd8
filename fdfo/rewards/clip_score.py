"""CLIP-type preference scores (PickScore, HPSv2, CLIP-H/L): logit_scale.exp() · cos(text, image)."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, CLIPModel

from fdfo.hub_files import HubFiles


class ClipScore:
    """Scores images against their prompts with a CLIP model, in float32, through the model's own processor.

    Float images in [0, 1] (training) are used as they are; uint8 images (evaluation) are rescaled by
    the processor, as the published evaluation does. Called without gradients, nothing is recorded.
    """

    def __init__(self, model: CLIPModel, processor, device: torch.device):
        self.model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.processor, self.device = processor, device

    @classmethod
    def from_pretrained(cls, model: HubFiles, processor: HubFiles, device: torch.device) -> ClipScore:
        """The scorer of the Hub files `model`, with the processor of `processor`."""
        with model.loading():
            clip = CLIPModel.from_pretrained(model.local(), dtype=torch.float32)
        with processor.loading():
            return cls(clip, AutoProcessor.from_pretrained(processor.local()), device)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable in float `images` where gradients are enabled: the processor's resize, crop and
        normalisation are torch operations (transformers' torchvision backend)."""
        pixels = self.processor.image_processor(
            images=list(images.to(self.device)), do_rescale=not images.is_floating_point(), return_tensors="pt"
        )["pixel_values"].to(self.device, torch.float32)
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embeds = self.model.get_image_features(pixel_values=pixels).pooler_output
        text_embeds = self.model.get_text_features(input_ids=text.input_ids.to(self.device),
                                                   attention_mask=text.attention_mask.to(self.device)).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return self.model.logit_scale.exp() * cosine
