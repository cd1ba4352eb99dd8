"""A Hugging Face cache of tiny random models under the real repo ids, laid out as huggingface_hub lays out what
it downloads (`models--org--name/` with `blobs/` named by SHA-256, `refs/main`, `snapshots/<commit>/` of links):
the loaders' real `from_pretrained` path, offline. Each repo also holds files of the real repo that fdfo must
not read (single-file checkpoints, other frameworks' weights), so a test sees what is fetched and what is not."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from fdfo.model.lora import attach_lora, save_lora
from fdfo.model.tiny import random_pipeline
from fdfo.rewards.image_reward import published_weights
from fdfo.rewards.twins import (random_clip, random_hpsv3, random_image_reward, random_qwen_vl,
                               save_processor_as_published)

SD35M = "stabilityai/stable-diffusion-3.5-medium"
SD35L = "stabilityai/stable-diffusion-3.5-large"
FLUX1DEV = "black-forest-labs/FLUX.1-dev"
FDFO_CHECKPOINTS = "nvidia/finite-difference-flow-optimization"
PUBLISHED_RUN = "fdfo-combined-reward-no-cfg"
# Files of the real repos that none of our commands reads (a few bytes each here).
NOT_READ = {
    SD35M: ["sd3.5_medium.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
            "text_encoders/t5xxl_fp16.safetensors", "README.md", "LICENSE.md"],
    SD35L: ["sd3.5_large.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/t5xxl_fp16.safetensors",
            "README.md"],
    FLUX1DEV: ["flux1-dev.safetensors", "ae.safetensors", "README.md", "LICENSE.md"],
    "yuvalkirstain/PickScore_v1": ["pytorch_model.bin"],
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": ["open_clip_pytorch_model.bin", "open_clip_model.safetensors",
                                              "pytorch_model.bin"],
    "adams-story/HPSv2-hf": ["README.md"],
    "openai/clip-vit-large-patch14": ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
    "Qwen/Qwen2.5-VL-7B-Instruct": ["README.md"],
    "zhwang/HPDv2": ["train.json", "test.json", "benchmark/benchmark_imgs/photo/00000.jpg"],
    FDFO_CHECKPOINTS: ["README.md"],
    "THUDM/ImageReward": ["README.md"],
    "google-bert/bert-base-uncased": ["model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack"],
    "MizzenAI/HPSv3": ["README.md"],
    "Qwen/Qwen2-VL-7B-Instruct": ["model-00001-of-00005.safetensors", "model-00005-of-00005.safetensors", "README.md"],
}
# HPSv3.safetensors names its weights as transformers 4.45's Qwen2-VL did (the package pins it).
HPSV3_LEGACY_NAMES = [("model.language_model.", "model."), ("model.visual.", "visual.")]
CLIP_REPOS = {"yuvalkirstain/PickScore_v1": 0, "adams-story/HPSv2-hf": 1, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": 2,
              "openai/clip-vit-large-patch14": 3}
HPDV2_PROMPTS = {style: [f"an {style} picture of a lighthouse number {i}" for i in range(3)]
                 for style in ("anime", "concept-art", "paintings", "photo")}


def add_repo(cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """The files below `folder` as the cached snapshot of `repo_id`'s main branch; returns the snapshot."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def write_not_read(folder: Path, repo_id: str) -> None:
    for name in NOT_READ.get(repo_id, []):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(f"not read: {repo_id}/{name}".encode())


def build_fake_hub(cache: Path) -> Path:
    """Every repo fdfo's default commands read, tiny and random, in the cache folder `cache` (HF_HUB_CACHE)."""
    with tempfile.TemporaryDirectory() as scratch:
        def repo(repo_id: str, save, repo_type: str = "model") -> None:
            folder = Path(scratch) / repo_id
            save(folder)
            write_not_read(folder, repo_id)
            add_repo(cache, repo_id, folder, repo_type)

        def pipeline(size: str):  # stored in bf16, as the published weights are
            def save(folder: Path) -> None:
                random_pipeline(size).to(torch.bfloat16).save_pretrained(folder)
            return save

        def clip(seed: int):
            def save(folder: Path) -> None:
                model, processor = random_clip(seed=seed)
                model.save_pretrained(folder)
                save_processor_as_published(processor, folder)
            return save

        def qwen(folder: Path) -> None:  # sharded, as the 7B model's five files are
            model, processor = random_qwen_vl()
            model.save_pretrained(folder, max_shard_size="200KB")
            save_processor_as_published(processor, folder)
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))

        def hpdv2(folder: Path) -> None:
            (folder / "benchmark").mkdir(parents=True)
            for style, prompts in HPDV2_PROMPTS.items():
                (folder / "benchmark" / f"{style}.json").write_text(json.dumps(prompts))

        def checkpoints(folder: Path) -> None:  # the published layout, <run>/epoch-*/, a LoRA of its own each
            lora = attach_lora(random_pipeline("tiny").transformer, rank=4, alpha=4)
            for epoch in (50, 100):
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(epoch)
                    for name, weight in lora.named_parameters():
                        if "lora_" in name:
                            weight.normal_(std=0.3)
                save_lora(lora, folder / PUBLISHED_RUN / f"epoch-{epoch:07d}")

        def image_reward(folder: Path) -> None:  # the package's two files
            model, _, med_config = random_image_reward()
            folder.mkdir(parents=True)
            torch.save(published_weights(model), folder / "ImageReward.pt")
            (folder / "med_config.json").write_text(json.dumps(med_config))

        def bert(folder: Path) -> None:
            random_image_reward()[1].save_pretrained(folder)

        def hpsv3(folder: Path) -> None:
            model, _ = random_hpsv3()
            folder.mkdir(parents=True)
            safetensors.torch.save_file({legacy_name(k): v.contiguous() for k, v in model.state_dict().items()},
                                        folder / "HPSv3.safetensors")

        def qwen2_vl(folder: Path) -> None:  # HPSv3's base: its configs and processor are read, not its weights
            model, processor = random_hpsv3()
            model.config.save_pretrained(folder)
            processor.tokenizer = random_qwen_vl()[1].tokenizer  # the base model's, without HPSv3's reward token
            save_processor_as_published(processor, folder)
            (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))

        repo(SD35M, pipeline("tiny"))
        repo(SD35L, pipeline("tiny"))  # the same pipeline class at other shapes: tiny ones here
        repo(FLUX1DEV, pipeline("tiny-flux"))
        repo("THUDM/ImageReward", image_reward)
        repo("google-bert/bert-base-uncased", bert)
        repo("MizzenAI/HPSv3", hpsv3)
        repo("Qwen/Qwen2-VL-7B-Instruct", qwen2_vl)
        for repo_id, seed in CLIP_REPOS.items():
            repo(repo_id, clip(seed))
        repo("Qwen/Qwen2.5-VL-7B-Instruct", qwen)
        repo("zhwang/HPDv2", hpdv2, repo_type="dataset")
        repo(FDFO_CHECKPOINTS, checkpoints)
    return cache


def legacy_name(key: str) -> str:
    for ours, legacy in HPSV3_LEGACY_NAMES:
        if key.startswith(ours):
            return legacy + key[len(ours):]
    return key


def snapshot_files(cache: Path) -> dict[str, set[str]]:
    """Every repo of the cache → the files its snapshot holds."""
    found = {}
    for root in sorted(cache.glob("*--*--*")):
        snapshot = next((root / "snapshots").iterdir())
        repo_id = root.name.split("--", 1)[1].replace("--", "/")
        found[repo_id] = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    return found
