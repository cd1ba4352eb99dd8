"""ImageReward and HPSv3 (fdfo/rewards/image_reward.py, hpsv3.py) against the published packages' own scoring code,
run side by side on the same random weights, images and prompts.

    pip download --no-deps image-reward==1.5 hpsv3==1.0.0 -d pkgs && (cd pkgs && for w in *.whl; do unzip -q -o $w -d ${w%%-*}; done)
    pip install --no-deps --target ENV transformers==4.45.2 tokenizers==0.20.3 huggingface_hub==0.26.2 \\
        trl==0.11.4 peft==0.13.2 timm==0.6.13 fairscale==0.4.13 qwen-vl-utils==0.0.8 fire termcolor pandas pytz \\
        datasets==3.0.1 dill==0.3.8 multiprocess==0.70.16 pyarrow tensorboard tensorboard-data-server absl-py \\
        markdown werkzeug grpcio omegaconf antlr4-python3-runtime==4.9.3 einops aiohttp aiohappyeyeballs \\
        aiosignal frozenlist multidict yarl propcache attrs
    python bench/reward_models_side_by_side.py --image-reward pkgs/image_reward --hpsv3 pkgs/hpsv3 --package-env ENV \\
        [--out bench/results/reward-models-side-by-side.json]

The packages pin transformers 4.45.2 (HPSv3) and timm 0.6.13 / fairscale 0.4.13 (ImageReward), so they run in a
subprocess with ENV (their pins) ahead of this environment's packages. What runs of them, unchanged:
ImageReward's `ImageReward` model class with its BLIP code and `ImageReward.score` (its package __init__, which
imports the optional CLIP/aesthetic scorers and the ReFL trainer, is skipped); HPSv3's
`create_model_and_processor` and `HPSv3RewardInferencer.reward` with the published HPSv3_7B.yaml, changed only in
the base model's path (a random Qwen2-VL of small shapes, saved by transformers 4.45) and fp32 instead of bf16 (so
the comparison sees the formulas, not bf16 rounding). Both packages' models are drawn by their own code; ours
then load those weights through their published file layouts (ImageReward.pt; HPSv3.safetensors with the base
model's config and processor) and score the same images. ImageReward's ViT is the published ViT-L/16 and its text
encoder BERT-base (the package builds them so), with a character vocabulary for the tokenizer (bert-base-uncased's
is not downloaded).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed", "red cube",
           "a lighthouse on a cliff at dusk, waves crashing below"]
HPSV3_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2))


# ---- the packages' side (transformers 4.45), in a subprocess --------------------------------------------------

def package_image_reward(package: Path, work: Path) -> list[float]:
    import torch
    from PIL import Image
    from transformers import BertTokenizer
    sys.modules["clip"] = types.ModuleType("clip")  # imported by the package's optional CLIP scorer only
    for name, path in [("ImageReward", package / "ImageReward"), ("ImageReward.models", package / "ImageReward/models")]:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    load = BertTokenizer.from_pretrained.__func__  # its init_tokenizer reads bert-base-uncased: ours instead
    BertTokenizer.from_pretrained = classmethod(lambda cls, name, *a, **k: load(cls, str(work / "bert"), *a, **k))
    ImageReward = importlib.import_module("ImageReward.ImageReward").ImageReward
    torch.manual_seed(0)
    model = ImageReward(med_config=str(work / "med_config.json")).eval()
    with torch.no_grad():  # its own init gives every image the score −mean/std (a head of std 1/769): redraw it
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(std=layer.in_features ** -0.5)
                layer.bias.normal_(std=0.1)
    torch.save(model.state_dict(), work / "ImageReward.pt")
    with torch.no_grad():
        return [model.score(p, Image.open(work / f"image{i}.png")) for i, p in enumerate(PROMPTS)]


def package_hpsv3(package: Path, work: Path) -> list[float]:
    import safetensors.torch
    import torch
    import yaml
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    sys.path.insert(0, str(package))
    from hpsv3 import inference
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml

    base = work / "qwen2vl"
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                           "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
    config = Qwen2VLConfig(vocab_size=len(tokenizer), **HPSV3_SHAPES, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], pad_token_id=ids["<|endoftext|>"],
                           bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(base)
    settings = yaml.safe_load((package / "hpsv3/config/HPSv3_7B.yaml").read_text())
    settings.update(model_name_or_path=str(base), bf16=False, torch_dtype="float32", disable_flash_attn2=True,
                    deepspeed=None, report_to="none")
    config_path = work / "HPSv3_tiny.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    (data, training, model_config, lora), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(config_path), is_train=False)
    torch.manual_seed(1)
    model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=lora, training_args=training)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "HPSv3.safetensors")
    scorer = inference.HPSv3RewardInferencer(str(config_path), str(work / "HPSv3.safetensors"), device="cpu")
    with torch.no_grad():
        rewards = scorer.reward([Image.open(work / f"image{i}.png") for i in range(len(PROMPTS))], PROMPTS)
    return rewards[:, 0].tolist()


# ---- ours (transformers 5) --------------------------------------------------------------------------------------

def prepare(work: Path) -> None:
    """Images, tokenizers and configs both sides read."""
    sys.path.insert(0, str(REPO))
    import torch
    from PIL import Image
    from fdfo.rewards.twins import QWEN_CHAT_TEMPLATE, bert_tokenizer, image_reward_med_config, qwen_tokenizer
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    coarse = torch.rand(len(PROMPTS), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, image in enumerate(torch.nn.functional.interpolate(coarse, size=(512, 512), mode="bilinear")):
        Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(work / f"image{i}.png")
    tokenizer = bert_tokenizer()
    (work / "bert").mkdir()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (work / "bert" / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
    # The package's text encoder is BERT-base (its head reads 768 features); + the two tokens it adds.
    med_config = {**image_reward_med_config("full", len(vocab) + 2), "encoder_width": 1024}
    (work / "med_config.json").write_text(json.dumps(med_config))
    base = work / "qwen2vl"
    qwen_tokenizer().save_pretrained(base)
    settings = json.loads((base / "tokenizer_config.json").read_text())  # a class both transformers versions know
    (base / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}))
    Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(base)
    (base / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}))


def ours(work: Path) -> dict[str, dict[str, list[float]]]:
    import torch
    from PIL import Image
    from transformers import BertTokenizer
    from fdfo.hub_files import HubFiles
    from fdfo.rewards import hpsv3
    from fdfo.rewards.image_reward import ImageRewardScore, load_published
    cpu = torch.device("cpu")
    uint8 = torch.stack([torch.from_numpy(__import__("numpy").array(Image.open(work / f"image{i}.png"))).permute(2, 0, 1)
                         for i in range(len(PROMPTS))])
    image_reward = ImageRewardScore(load_published(torch.load(work / "ImageReward.pt", weights_only=True),
                                                   json.loads((work / "med_config.json").read_text())),
                                    BertTokenizer.from_pretrained(work / "bert"), cpu)
    # HPSv3 through its real loader, its two repos given as local folders.
    hpsv3.HPSV3 = HubFiles("HPSv3", str(work), ("HPSv3.safetensors",))
    hpsv3.QWEN2_VL = HubFiles("Qwen2-VL", str(work / "qwen2vl"), ("*",))
    hps = hpsv3.Hpsv3Score.from_pretrained(cpu)
    with torch.no_grad():
        return {name: {"uint8": score(uint8, PROMPTS).tolist(), "float": score(uint8.float() / 255, PROMPTS).tolist()}
                for name, score in [("image_reward", image_reward), ("hpsv3", hps)]}


def compare(theirs: list[float], mine: list[float]) -> dict:
    import numpy as np
    gap = np.abs(np.array(theirs) - np.array(mine))
    return {"max_abs_difference": float(gap.max()), "spread_of_scores": float(np.std(theirs)),
            "max_difference_over_spread": float(gap.max() / np.std(theirs))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-reward", type=Path)
    parser.add_argument("--hpsv3", type=Path)
    parser.add_argument("--package-env", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/reward-models-side-by-side.json")
    parser.add_argument("--package-side", choices=["image_reward", "hpsv3"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.package_side:  # inside the subprocess
        run = {"image_reward": package_image_reward, "hpsv3": package_hpsv3}[args.package_side]
        package = args.image_reward if args.package_side == "image_reward" else args.hpsv3
        print(json.dumps(run(package.resolve(), args.work)))
        return
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        prepare(work)
        theirs = {}
        for side in ("image_reward", "hpsv3"):
            env = {**os.environ, "PYTHONPATH": str(args.package_env.resolve()), "HF_HUB_OFFLINE": "1"}
            result = subprocess.run([sys.executable, __file__, "--package-side", side, "--work", str(work),
                                     "--image-reward", str(args.image_reward), "--hpsv3", str(args.hpsv3)],
                                    env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"the {side} package failed:\n{result.stderr[-4000:]}")
            theirs[side] = json.loads(result.stdout.strip().splitlines()[-1])
        mine = ours(work)
    report = {name: {"package": theirs[name], "ours_uint8": mine[name]["uint8"], "ours_float": mine[name]["float"],
                     "uint8_path": compare(theirs[name], mine[name]["uint8"]),
                     "float_path": compare(theirs[name], mine[name]["float"])} for name in theirs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report.items():
        print(f"{name}: package {['%.5f' % v for v in r['package']]}\n  ours (uint8) max |Δ| "
              f"{r['uint8_path']['max_abs_difference']:.2e} ({r['uint8_path']['max_difference_over_spread']:.2e} of the "
              f"spread); ours (float) {r['float_path']['max_abs_difference']:.2e}")


if __name__ == "__main__":
    main()
