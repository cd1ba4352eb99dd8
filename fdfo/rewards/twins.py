"""Random-weight twins of the reward models (same classes, our own tiny tokenizers), for offline CPU runs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from fdfo.model.tiny import clip_tokenizer


# PickScore / CLIP-ViT-H/14 shapes, and tiny ones.
CLIP_SHAPES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=32), 32),
    "full": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  vocab_size=49408, hidden_act="gelu"),
             dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  patch_size=14, hidden_act="gelu"), 1024),
}


def random_clip(seed: int = 0, size: str = "tiny", device: torch.device | str = "cpu") -> tuple[CLIPModel, CLIPProcessor]:
    """A random CLIP model with PickScore's structure (text + vision towers, projections, logit scale);
    `size="full"` gives PickScore's real shapes (ViT-H/14), for benchmarks."""
    tokenizer = clip_tokenizer()
    text_shape, vision_shape, projection_dim = CLIP_SHAPES[size]
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), **text_shape, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config=dict(image_size=224, **vision_shape),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_processor_as_published(processor, folder: Path) -> None:
    """A processor in the files the published repos have (they predate processor_config.json and .jinja
    templates): preprocessor_config.json and the tokenizer's files."""
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    for name in ("processor_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# Our own chat template in Qwen's turn format (the real processor brings its own from the Hub).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """Character-level tokenizer with Qwen's special tokens; "Yes" and "No" are single tokens as in Qwen's."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "Yes", "No", *sorted(set(string.printable))]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("Yes|No|."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=QWEN_SPECIAL,
                                        padding_side="left")
    return tokenizer


QWEN_SHAPES = {
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, mrope_section=[2, 3, 3]),
             dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[1])),
    "7b": (dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064),
           dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                fullatt_block_indexes=[7, 15, 23, 31])),
}


def qwen_config(config_class, text_shape: dict, vision_shape: dict, tokenizer):
    """A Qwen-VL config of `config_class` (Qwen2-VL or Qwen2.5-VL) at the given shapes, with our tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    text_shape = dict(text_shape)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": text_shape.pop("mrope_section")}
    return config_class(
        text_config=dict(**{"vocab_size": len(tokenizer), **text_shape}, max_position_embeddings=4096,
                         rope_parameters=rope, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision_shape,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def qwen_processor(processor_class, tokenizer):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    image_processor = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                           video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)


def random_qwen_vl(seed: int = 0, size: str = "tiny", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """A random Qwen2.5-VL with the real structure (windowed vision tower, patch merger, M-RoPE decoder);
    `size="7b"` gives Qwen2.5-VL-7B's shapes, for benchmarks."""
    from fdfo.model.tiny import default_dtype
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = qwen_tokenizer()
    config = qwen_config(Qwen2_5_VLConfig, *QWEN_SHAPES[size], tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model, qwen_processor(Qwen2_5_VLProcessor, tokenizer)


# Qwen2-VL's vision tower (HPSv3's base): full attention in every block, LayerNorm and a GELU MLP.
QWEN2_VISION_SHAPES = {"tiny": dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
                       "7b": dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)}


def random_hpsv3(seed: int = 0, size: str = "tiny", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """A random HPSv3 (Qwen2-VL with the reward token and head); `size="7b"`: its real shapes, for benchmarks."""
    from fdfo.model.tiny import default_dtype
    from fdfo.rewards.hpsv3 import Hpsv3Model, reward_token
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    processor = qwen_processor(Qwen2VLProcessor, qwen_tokenizer())
    reward_token(processor)
    config = qwen_config(Qwen2VLConfig, QWEN_SHAPES[size][0], QWEN2_VISION_SHAPES[size], processor.tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device), default_dtype(dtype):
        torch.manual_seed(seed)
        model = Hpsv3Model(config)
    return model, processor


def bert_tokenizer():
    """Character-level WordPiece tokenizer with BERT's special tokens ([PAD] = 0, as in bert-base-uncased)."""
    import string

    from transformers import BertTokenizer
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(string.ascii_lowercase + string.digits
                                                                          + string.punctuation))
    pieces += ["##" + p for p in pieces[5:]]
    return BertTokenizer(vocab={p: i for i, p in enumerate(pieces)})


# ImageReward's published shapes (BLIP ViT-L/16 at 224 px, BERT-base), and tiny ones (heads of 64 as BLIP's).
IMAGE_REWARD_SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, patch_size=32),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "full": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, patch_size=16),
             dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
}


def image_reward_med_config(size: str, vocab_size: int) -> dict:
    """The text encoder's med_config.json (BERT's fields), as the package's file."""
    return {**IMAGE_REWARD_SHAPES[size][1], "vocab_size": vocab_size, "max_position_embeddings": 512,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0, "add_cross_attention": True,
            "model_type": "bert", "encoder_width": IMAGE_REWARD_SHAPES[size][0]["hidden_size"]}


def random_image_reward(seed: int = 0, size: str = "tiny", device: torch.device | str = "cpu"):
    """A random ImageReward (BLIP ViT, cross-attending BERT, linear head) and its tokenizer, with med_config.json."""
    from fdfo.rewards.image_reward import VIT_HEAD_DIM, ImageRewardModel, text_config
    from transformers import BlipVisionConfig

    tokenizer = bert_tokenizer()
    vision_shape = IMAGE_REWARD_SHAPES[size][0]
    vision = BlipVisionConfig(**vision_shape, num_attention_heads=vision_shape["hidden_size"] // VIT_HEAD_DIM,
                              image_size=224, layer_norm_eps=1e-6, hidden_act="gelu",
                              initializer_range=0.02)  # BLIP's default, 1e-10, would draw an image-blind twin
    med_config = image_reward_med_config(size, len(tokenizer))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = ImageRewardModel(vision, text_config(med_config, vision.hidden_size))
        for layer in model.head:  # unit gain through the five linear layers: scores that vary visibly
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
    return model, tokenizer, med_config


def vlm_twin(twins: str, device: torch.device | str):
    """The VLM stand-in for `twins`: "tiny" (float32, CPU tests) or "full" (Qwen2.5-VL-7B shapes, bf16)."""
    if twins == "full":
        return random_qwen_vl(size="7b", device=device, dtype=torch.bfloat16)
    return random_qwen_vl(device=device)
