import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import SD3Transformer2DModel
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from peft import get_peft_model
from PIL import Image

from fdfo.runs.checkpoint import CheckpointError, find_checkpoint
from fdfo.cli import parse, parse_train_config
from fdfo.config import ConfigError, GenerateConfig, MetricsConfig
from fdfo.runs.ema import EmaMissingError
from fdfo.evaluation.generate import generate
from fdfo.evaluation.images import generate_images, image_noise, to_uint8
from fdfo.evaluation.metrics import evaluate
from fdfo.evaluation.method_protocol import apply_protocol
from fdfo.evaluation.grid import grid_size, make_grid
from fdfo.runs.hub import HubCheckpoint, parse_checkpoint, resolve_checkpoint
from fdfo.model.lora import LoraLoadError, attach_lora, attach_lora_from, lora_config, save_lora
from fdfo.model.lora_folder import ADAPTER_FILES
from fdfo.model.sd3 import SD3
from fdfo.model.tiny import TINY_TRANSFORMER, random_pipeline
from fdfo.harness.training_loop import train


@pytest.mark.parametrize("spec,expected", [
    ("hf:nvidia/finite-difference-flow-optimization/fdfo-combined-reward-no-cfg/epoch-0000100",
     HubCheckpoint("nvidia/finite-difference-flow-optimization", "fdfo-combined-reward-no-cfg/epoch-0000100")),
    ("https://huggingface.co/nvidia/fdfo/tree/main/run-a/epoch-0000005",
     HubCheckpoint("nvidia/fdfo", "run-a/epoch-0000005", "main")),
    ("https://huggingface.co/nvidia/fdfo/tree/v1.0/run-a/epoch-0000005/",
     HubCheckpoint("nvidia/fdfo", "run-a/epoch-0000005", "v1.0")),
    ("runs/00003-pickscore-cfg_1p0", Path("runs/00003-pickscore-cfg_1p0")),
])
def test_checkpoint_forms(spec, expected):
    assert parse_checkpoint(spec) == expected


@pytest.mark.parametrize("spec", ["hf:nvidia/only-repo", "https://huggingface.co/nvidia/fdfo/blob/main/x",
                                  "https://example.com/a/b"])
def test_bad_checkpoint_forms_say_how_to_write_them(spec):
    with pytest.raises(CheckpointError, match="hf:<org>/<repo>/<subfolder>|huggingface.co/<org>/<repo>/tree"):
        parse_checkpoint(spec)


def test_grid_geometry():
    images = torch.randint(0, 255, (2 * 2 * 3, 3, 32, 32), dtype=torch.uint8)
    grid = make_grid(images, ["a cat", "a dog"], rows=2, cols=3)
    caption_height = grid.height - 2 * 32 - 8
    assert (grid.width, grid.height) == grid_size(2, 2, 3, 32, caption_height) == (2 * 3 * 32 + 3 * 8, grid.height)
    # Image k of prompt p sits at column k % cols, row k // cols of block p.
    pixel = Image.fromarray(images[4].permute(1, 2, 0).numpy()).getpixel((0, 0))
    assert grid.getpixel((8 + 32, caption_height + 32)) == pixel
    # Row labels take a margin on the left and shift every image right by its width.
    labelled = make_grid(images, ["a cat", "a dog"], rows=2, cols=3, row_labels=["base model", "after 20 epochs"])
    margin = labelled.width - grid.width
    assert margin > 0 and labelled.height == grid.height
    assert labelled.getpixel((margin + 8 + 32, caption_height + 32)) == pixel
    with pytest.raises(ValueError, match="one label per row"):
        make_grid(images, ["a cat", "a dog"], rows=2, cols=3, row_labels=["base model"])


def test_image_noise_is_drawn_as_published():
    # One CPU generator per image, seeded with seed mod 2³¹, drawn in the pipeline's dtype as (1, C, h, w).
    seeds = [0, 7, 2**31 + 5]
    for dtype in (torch.float32, torch.bfloat16):
        noise = image_noise(seeds, (16, 8, 8), dtype)
        assert noise.dtype == dtype and noise.shape == (3, 16, 8, 8)
        for row, seed in zip(noise, seeds):
            expected = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(seed % 2**31), dtype=dtype)
            assert torch.equal(row, expected[0])
    assert torch.equal(image_noise([2**31 + 5], (16, 8, 8), torch.float32), image_noise([5], (16, 8, 8), torch.float32))


def test_uint8_conversion_is_the_published_one():
    # x·255 + 0.5 in bf16, clipped, truncated: 0.8125·255 = 207.19 rounds to 207 in bf16, + 0.5 ties to 208
    # (round(255·x) gives 207); 1/512 gives 1 (round: 0); 1.0 gives 255.5 → 256 in bf16, clipped to 255.
    x = torch.tensor([0.0, 1 / 512, 0.8125, 1.0], dtype=torch.bfloat16)
    assert to_uint8(x).tolist() == [0, 1, 208, 255]
    assert to_uint8(torch.tensor([0.5, 0.8125])).tolist() == [128, 207]  # float32: 127.5 + 0.5; 207.69


def test_generation_defaults_to_the_pipelines_t5_length_and_the_published_seeds(tmp_path, monkeypatch):
    assert apply_protocol(parse(GenerateConfig, []), None)[0].max_sequence_length == 256  # FDFO: the pipeline's
    # As published, image i of the grid (prompt-major) starts from seed + i: prompt 2's images are 14 and 15.
    calls = {}

    def spy(pipe, prompts, seeds, *args, **kwargs):
        calls.update(prompts=prompts, seeds=seeds)
        return torch.zeros(len(prompts), 3, 8, 8, dtype=torch.uint8)
    monkeypatch.setattr("fdfo.evaluation.generate.generate_images", spy)
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    generate(parse(GenerateConfig, ["--pretrained-model", "tiny", "--prompts", str(tmp_path / "prompts.txt"),
                                    "--seed", "10", "--grid-rows", "1", "--grid-cols", "2",
                                    "--out", str(tmp_path / "grid.png")]))
    assert calls == {"prompts": ["a", "a", "b", "b", "c", "c"], "seeds": [10, 11, 12, 13, 14, 15]}


def test_train_then_generate_round_trip(tmp_path):
    run_dir = train(parse_train_config(["--pretrained-model", "tiny", "--reward-preset", "compressibility",
                                        "--total-pairs-per-epoch", "4", "--num-epochs", "1",
                                        "--sample.num-solver-steps", "2", "--runs-dir", str(tmp_path),
                                        "--ema-decay", "0.9"]))
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    out = generate(parse(GenerateConfig, [
        "--pretrained-model", "tiny", "--checkpoint", str(run_dir), "--prompts", str(tmp_path / "prompts.txt"),
        "--out", str(tmp_path / "new" / "grid.png"), "--num-solver-steps", "2", "--grid-rows", "1",
        "--grid-cols", "2", "--ema"]))
    grid = Image.open(out)
    assert grid.width == 2 * 2 * 64 + 3 * 8  # 2 prompts × 2 columns of 64 px, created folder
    assert resolve_checkpoint(str(run_dir), ema=True) == find_checkpoint(run_dir) / "ema"


def test_ema_of_a_checkpoint_without_one_is_refused(tmp_path):
    get_peft_model(random_pipeline("tiny").transformer, lora_config(4, 8)).save_pretrained(tmp_path / "epoch-0000001")
    with pytest.raises(EmaMissingError, match="holds no EMA weights .*only runs trained with --ema-decay"):
        resolve_checkpoint(str(tmp_path / "epoch-0000001"), ema=True)
    with pytest.raises(ConfigError, match="--ema uses a checkpoint's EMA weights: give --checkpoint too"):
        generate(parse(GenerateConfig, ["--pretrained-model", "tiny", "--ema"]))


def test_published_format_folder_loads_without_missing_or_unexpected_keys(tmp_path):
    # A PEFT adapter with the published LoRA config, saved as PeftModel.save_pretrained does.
    published = get_peft_model(random_pipeline("tiny").transformer, lora_config(32, 64))
    published.save_pretrained(tmp_path / "epoch-0000100")
    model = attach_lora_from(random_pipeline("tiny").transformer, resolve_checkpoint(str(tmp_path / "epoch-0000100")))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in published.parameters() if p.requires_grad)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    # A transformer of another width: the same keys, other shapes.
    wider = SD3Transformer2DModel(**{**TINY_TRANSFORMER, "num_attention_heads": 8, "caption_projection_dim": 64})
    get_peft_model(wider, lora_config(4, 8)).save_pretrained(tmp_path / "wide")
    with pytest.raises(LoraLoadError, match="of another shape"):
        attach_lora_from(random_pipeline("tiny").transformer, tmp_path / "wide")


def test_integer_timesteps_feed_the_transformer_what_diffusionnfts_pipeline_feeds_it():
    # Its pipeline: torch.full(..., sigma * 1000, dtype=torch.long) for each σ of the scheduler's grid.
    backbone = SD3(random_pipeline("tiny"))
    pipe = backbone.pipe
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    prompts, seeds = ["a red cube", "a blue sphere"], [0, 1]
    with_float = generate_images(backbone, prompts, seeds, 6, 1.0, None, 16, batch_size=2)
    with_integer = generate_images(backbone, prompts, seeds, 6, 1.0, None, 16, batch_size=2, integer=True)
    pipe.scheduler.set_timesteps(6)
    published = [torch.full([2], sigma * 1000, dtype=torch.long) for sigma in pipe.scheduler.sigmas.float()[:-1]]
    assert all(t.dtype == torch.float32 for t in seen[:6]) and any(t.frac().abs().max() > 0.1 for t in seen[:6])
    assert [t.dtype for t in seen[6:]] == [torch.long] * 6
    assert all(torch.equal(t, p) for t, p in zip(seen[6:], published, strict=True))
    assert not torch.equal(with_float, with_integer)
    assert len(pipe.transformer._forward_pre_hooks) == 1  # ours is removed again


def test_a_diffusion_nft_run_is_evaluated_with_its_protocol_from_its_ema(tmp_path, capsys):
    # The recipe keeps DiffusionNFT's EMA; metrics.py then evaluates it as published: EMA weights, 128 T5 tokens,
    # integer timesteps (the tiny model's offline prompts stand in for pickscore_test).
    run_dir = train(parse_train_config(["--pretrained-model", "tiny", "--method", "diffusion_nft",
                                        "--total-pairs-per-epoch", "8", "--num-epochs", "1", "--nft.group-size", "4",
                                        "--sample.num-solver-steps", "2", "--runs-dir", str(tmp_path)]))
    checkpoint = find_checkpoint(run_dir)
    assert (checkpoint / "ema").is_dir()
    report = evaluate(parse(MetricsConfig, ["--pretrained-model", "tiny", "--checkpoint", str(run_dir),
                                            "--num-prompts", "2", "--num-solver-steps", "2", "--resolution", "32"]))
    assert report["checkpoint"] == str(checkpoint / "ema")
    assert (report["config"]["protocol"], report["config"]["max_sequence_length"], report["config"]["prompt_set"],
            report["config"]["integer_timesteps"], report["config"]["guidance_scale"]) == (
        "diffusion_nft", 128, "pickscore_test", True, 1.0)
    assert "Evaluating with diffusion_nft's protocol (DiffusionNFT's scripts/train_nft_sd3.py eval_fn(); the " \
           "checkpoint's method, diffusion_nft)" in capsys.readouterr().out


def published_run(folder: Path, epochs: list[int]) -> Path:
    """A run folder in the published checkpoints' layout, `<run>/epoch-*/` (no checkpoints/), of tiny LoRAs."""
    lora = attach_lora(random_pipeline("tiny").transformer, rank=4, alpha=4)
    for epoch in epochs:
        save_lora(lora, folder / f"epoch-{epoch:07d}")
    return folder


def test_a_run_folder_in_the_published_layout_gives_its_newest_checkpoint(tmp_path, empty_hub_cache, monkeypatch):
    run = published_run(tmp_path / "fdfo-combined-reward-no-cfg", [20, 100])
    assert resolve_checkpoint(str(run)) == run / "epoch-0000100"
    # The same run in the Hugging Face cache, offline: `hf:<org>/<repo>/<run>` is its newest checkpoint.
    commit = "1" * 40
    repo = empty_hub_cache / "models--nvidia--finite-difference-flow-optimization"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(run, repo / "snapshots" / commit / run.name)
    assert (resolve_checkpoint(f"hf:nvidia/finite-difference-flow-optimization/{run.name}")
            == repo / "snapshots" / commit / run.name / "epoch-0000100")
    # Online, only the newest checkpoint's folder is downloaded (its file list asked for first), in either layout.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    asked = []
    files = [f"{run.name}/epoch-{e:07d}/{name}" for e in (20, 100, 3) for name in ADAPTER_FILES] + ["README.md",
             "ours/checkpoints/epoch-0000007/adapter_model.safetensors", "ours/checkpoints/epoch-0000012/adapter_model.safetensors"]
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo, revision: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, revision, allow_patterns:
                        asked.append(allow_patterns) or str(tmp_path / "online"))
    for subdir in (run.name, "ours"):
        with pytest.raises(CheckpointError):  # nothing was really downloaded
            resolve_checkpoint(f"hf:nvidia/finite-difference-flow-optimization/{subdir}")
    assert asked == [[f"{run.name}/epoch-0000100/*"], ["ours/checkpoints/epoch-0000012/*"]]
