"""Yes/no scores from Qwen2.5-VL: 100 · sigmoid(logit("Yes") − logit("No")) at the last position."""

from __future__ import annotations

import torch

from fdfo import distributed
from fdfo.hub_files import HubFiles, model_files

VLM_MODELS = {"qwenvl-7b": "Qwen/Qwen2.5-VL-7B-Instruct", "qwenvl-3b": "Qwen/Qwen2.5-VL-3B-Instruct"}
SYSTEM_PROMPT = "You are a helpful assistant."
TRAIN_QUESTION = 'Does this image match the caption "{prompt}"? Answer Yes or No.'


def vlm_files(name: str) -> HubFiles:
    return model_files(f"the VLM {name}", VLM_MODELS[name])


class YesNoVlm:
    """A chat VLM asked one question per image; the answer's Yes/No logits give a score in [0, 100].

    `buffer_dtype` casts the model's floating buffers (the rotary frequencies of the vision tower and
    the decoder): bf16 reproduces the published training reward, whose FSDP1 mixed precision casts them
    (also on one GPU); None keeps them exact, as the published evaluation does.
    """

    def __init__(self, model: torch.nn.Module, processor, device: torch.device, shard: bool = False,
                 buffer_dtype: torch.dtype | None = None):
        self.processor, self.device = processor, device
        self.processor.tokenizer.padding_side = "left"  # the last position is the answer's for every row
        self.yes, self.no = (single_token(processor.tokenizer, word) for word in ("Yes", "No"))
        self.model = model.to(device).eval().requires_grad_(False)
        if buffer_dtype is not None:
            cast_buffers(self.model, buffer_dtype)
        use_packed_window_attention(self.model)
        self.sharded = shard and distributed.world_size() > 1
        if self.sharded:
            shard_model(self.model)

    @classmethod
    def from_pretrained(cls, name: str, device: torch.device, shard: bool,
                        buffer_dtype: torch.dtype | None = None) -> YesNoVlm:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        files = vlm_files(name)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with files.loading():
            folder = files.local()
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype)
            processor = AutoProcessor.from_pretrained(folder)
        return cls(model, processor, device, shard, buffer_dtype)

    @torch.no_grad()
    def score(self, images: torch.Tensor, questions: list[str], resize: int | None) -> torch.Tensor:
        """Float images in [0, 1] (resized bilinearly to `resize` px if given) or uint8 images, one question each."""
        if resize is not None:
            images = torch.nn.functional.interpolate(images.float(), size=(resize, resize), mode="bilinear",
                                                     align_corners=False).clamp(0, 1)
        chats = [self.processor.apply_chat_template(chat(q), tokenize=False, add_generation_prompt=True)
                 for q in questions]
        inputs = self.processor(text=chats, images=list(images.cpu()), padding=True, return_tensors="pt",
                                do_rescale=not images.is_floating_point()).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1].float()
        return 100 * torch.sigmoid(logits[:, self.yes] - logits[:, self.no])


def cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every floating buffer of `model` in `dtype`, as FSDP1's MixedPrecision(buffer_dtype=dtype) leaves them."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(dtype))


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def single_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"The VLM's tokenizer splits {word!r} into {len(ids)} tokens {ids}; the yes/no score needs "
                         "it to be a single token. Use a Qwen2.5-VL checkpoint (--vlm-model-name).")
    return ids[0]


# "flash" in the name makes Qwen2.5-VL's vision tower hand over all its attention windows in one packed call
# (cu_seqlens) instead of looping over them with one SDPA call each (~25 windows per image, 32 layers).
PACKED_ATTENTION = "flash_fdfo_packed"


def use_packed_window_attention(model: torch.nn.Module) -> None:
    """Route the vision tower's windowed attention through one variable-length attention call per layer."""
    from transformers import AttentionInterface
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    model.config.vision_config._attn_implementation = PACKED_ATTENTION


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention within each packed sequence: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    return varlen_attention(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scaling).unsqueeze(0), None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     scale: float | None) -> torch.Tensor:
    """torch's flash-attention kernel for packed sequences on GPU; one SDPA call per sequence elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale)
    bounds = cu_seqlens.tolist()
    return torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=scale).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ])


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 full shard over all ranks: each transformer block, then the rest; parameters gathered per block."""
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if type(module).__name__ in ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"):
            fully_shard(module)
    fully_shard(model)
