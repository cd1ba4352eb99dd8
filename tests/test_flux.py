"""FLUX.1 behind the backbone interface (fdfo/model/flux.py), on the tiny random twin `tiny-flux`: what differs from
SD3 (the σ grid's shift, the guidance embedding, packed latents) against diffusers' own FluxPipeline and hand
computation, and the harness (every method, resume, ranks, generate, metrics) run on it."""

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from fdfo.cli import parse, parse_train_config
from fdfo.config import ConfigError, GenerateConfig, MetricsConfig
from fdfo.evaluation.generate import generate
from fdfo.evaluation.metrics import evaluate
from fdfo.harness.training_loop import train
from fdfo.hub_files import ModelLoadError
from fdfo.model.flux import Flux
from fdfo.model.loading import backbone_class, load_backbone
from fdfo.model.lora_folder import LoraLoadError
from fdfo.model.sampler import sample_rollouts
from fdfo.model.sd3 import SD3
from fdfo.runs.runlog import read_log
from tests.conftest import ROOT, torchrun
from tests.test_methods import BACKWARDS_PER_EPOCH, FORWARDS_PER_EPOCH, small

PROMPTS = ["a red cube", "a cat on a mat"]


@pytest.fixture
def flux():
    return load_backbone("tiny-flux", torch.device("cpu"), torch.float32)


def flux_run(*flags):
    """The methods' small command line on tiny-flux."""
    return [flag if flag != "tiny" else "tiny-flux" for flag in small("fdfo")] + list(flags)


def lora(run_dir, epoch):
    from safetensors.torch import load_file
    return load_file(Path(run_dir) / "checkpoints" / f"epoch-{epoch:07d}" / "adapter_model.safetensors")


def test_the_backbone_comes_from_the_name_or_model_index_json(tmp_path):
    assert backbone_class("tiny-flux") is Flux and backbone_class("flux-random") is Flux
    assert backbone_class("black-forest-labs/FLUX.1-dev") is Flux
    assert backbone_class("stabilityai/stable-diffusion-3.5-large") is SD3 and backbone_class("tiny") is SD3
    for pipeline, expected in [("FluxPipeline", Flux), ("StableDiffusion3Pipeline", SD3)]:
        (tmp_path / pipeline).mkdir()
        (tmp_path / pipeline / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        assert backbone_class(str(tmp_path / pipeline)) is expected
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError, match="is a StableDiffusionXLPipeline; fdfo trains StableDiffusion3Pipeline "
                                             "and FluxPipeline models"):
        backbone_class(str(tmp_path / "sdxl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json is missing, so this is not a diffusers pipeline"):
        backbone_class(str(tmp_path / "empty"))


def test_the_sigma_grid_is_shifted_by_the_images_token_count_by_hand(flux):
    # FluxPipeline: σ = 1 … 1/N evenly, then e^μ / (e^μ + 1/σ − 1), with μ linear in the packed tokens from
    # 0.5 at 256 tokens to 1.15 at 4096.
    for resolution in (32, 64):
        tokens = (resolution // 8 // 2) ** 2
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        plain = [1 - i * (1 - 1 / 4) / 3 for i in range(4)]
        expected = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in plain] + [0.0]
        got = flux.sigmas(4, resolution, torch.device("cpu"))
        assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert not torch.equal(flux.sigmas(4, 32, torch.device("cpu")), flux.sigmas(4, 64, torch.device("cpu")))


def test_guidance_is_one_embedded_pass_without_an_empty_prompt(flux):
    cond = flux.encode(PROMPTS, guidance_scale=3.5, max_sequence_length=32)
    assert cond.uncond_embeds is None and not flux.uses_cfg(3.5)
    rows = []
    flux.transformer.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[0]),
                                           with_kwargs=True)
    x = torch.randn(2, *flux.latent_shape(32), generator=torch.Generator().manual_seed(0))
    v1, v35 = (flux.velocity(flux.transformer, x, torch.tensor(0.7), cond, g) for g in (1.0, 3.5))
    assert rows == [2, 2]  # one pass per velocity, one row per image
    assert v1.shape == x.shape and (v1 - v35).abs().max() > 1e-3  # the embedding's value matters
    # ⌊1000σ⌋/1000: σ = 0.7004 is fed as 0.7
    exact = flux.velocity(flux.transformer, x, torch.tensor(0.7), cond, 3.5)
    assert torch.equal(flux.velocity(flux.transformer, x, torch.tensor(0.7004), cond, 3.5, integer_timestep=True),
                       exact)


def test_our_ode_sampler_gives_the_flux_pipelines_images(flux):
    cond = flux.encode(PROMPTS, guidance_scale=3.5, max_sequence_length=32)
    ours = sample_rollouts(flux, cond, [torch.Generator().manual_seed(s) for s in (3, 4)], num_steps=4,
                           noise_level=0.0, guidance_scale=3.5, resolution=32).images
    noise = torch.stack([torch.randn(flux.latent_shape(32), generator=torch.Generator().manual_seed(s))
                         for s in (3, 4)])
    assert isinstance(flux.pipe, FluxPipeline)
    theirs = flux.generate(PROMPTS, noise, num_steps=4, guidance_scale=3.5, resolution=32, max_sequence_length=32)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-5  # measured: identical


@pytest.mark.parametrize("method", ["fdfo", "fdfo_grad", "flow_grpo", "diffusion_nft", "draft", "rsm"])
def test_each_method_trains_tiny_flux_with_its_lora_in_both_streams(method, tmp_path):
    args = [flag if flag != "tiny" else "tiny-flux" for flag in small(method)]
    run_dir = train(parse_train_config([*args, "--num-epochs", "2", "--runs-dir", str(tmp_path)]))
    records = [r for r in read_log(run_dir) if r["kind"] == "epoch"]
    assert [r["reward_evaluations"] for r in records] == [16, 32]
    assert [r["transformer_forwards"] for r in records] == [FORWARDS_PER_EPOCH[method] * n for n in (1, 2)]
    assert [r["transformer_backwards"] for r in records] == [BACKWARDS_PER_EPOCH[method] * n for n in (1, 2)]
    weights = lora(run_dir, 2)
    moved = {k.split(".")[2] for k, w in weights.items() if "lora_B" in k and w.abs().max() > 1e-5}
    assert moved == {"transformer_blocks", "single_transformer_blocks"}  # the LoRA learns in both streams


def test_a_flux_run_resumes_bit_for_bit(tmp_path):
    straight = train(parse_train_config(flux_run("--num-epochs", "3", "--save-freq", "1",
                                                 "--runs-dir", str(tmp_path / "a"))))
    first = train(parse_train_config(flux_run("--num-epochs", "2", "--save-freq", "1",
                                              "--runs-dir", str(tmp_path / "b"))))
    resumed = train(parse_train_config(flux_run("--num-epochs", "3", "--save-freq", "1",
                                                "--runs-dir", str(tmp_path / "b"), "--resume-from", str(first))))
    expected, got = lora(straight, 3), lora(resumed, 3)
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_flux_run_gives_the_same_lora_on_1_and_2_ranks(tmp_path):
    runs = {}
    for n in (1, 2):
        torchrun(n, ROOT / "train.py", *flux_run("--reward-preset", "pickscore", "--num-epochs", "2",
                                                 "--save-freq", "2", "--runs-dir", str(tmp_path / f"ranks{n}")))
        (runs[n],) = (tmp_path / f"ranks{n}").iterdir()
    one, two = lora(runs[1], 2), lora(runs[2], 2)
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"largest LoRA weight difference, 2 ranks vs 1, after 2 epochs: {worst:.3g}")
    assert worst < 1e-5  # float reduction order only, as SD3's (tests/test_train.py)


@pytest.fixture(scope="module")
def flux_checkpoint(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return train(parse_train_config(flux_run("--num-epochs", "1", "--runs-dir", str(runs))))


def test_generate_and_metrics_run_on_a_flux_checkpoint(flux_checkpoint, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    out = generate(parse(GenerateConfig, [
        "--pretrained-model", "tiny-flux", "--checkpoint", str(flux_checkpoint), "--prompts",
        str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "grid.png"), "--num-solver-steps", "2",
        "--grid-rows", "1", "--grid-cols", "2"]))
    assert out.is_file()
    report = evaluate(parse(MetricsConfig, [
        "--pretrained-model", "tiny-flux", "--checkpoint", str(flux_checkpoint), "--prompt-set", "pickscore_train",
        "--num-prompts", "3", "--num-solver-steps", "2", "--resolution", "32", "--metrics", "pickscore"]))
    assert report["results"]["pickscore"]["count"] == 3 and math.isfinite(report["results"]["pickscore"]["mean"])


def test_what_flux_cannot_do_is_refused_in_a_sentence(flux_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--max-memory-gib plans with activation costs measured on SD3's blocks"):
        train(parse_train_config(flux_run("--max-memory-gib", "22", "--runs-dir", str(tmp_path / "runs"))))
    assert not any((tmp_path / "runs").glob("*/checkpoints"))
    with pytest.raises(LoraLoadError, match="does not fit this model|weights missing"):  # a FLUX LoRA on SD3
        generate(parse(GenerateConfig, ["--pretrained-model", "tiny", "--checkpoint", str(flux_checkpoint),
                                        "--out", str(tmp_path / "grid.png"), "--num-solver-steps", "2"]))
