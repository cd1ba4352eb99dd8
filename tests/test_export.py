import subprocess
import sys

import pytest
import safetensors.torch
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from fdfo.runs.export import WEIGHT_NAME, export
from fdfo.config import ConfigError, ExportConfig
from fdfo.evaluation.images import generate_images
from fdfo.model.lora import attach_lora, attach_lora_from, save_lora
from fdfo.hub_files import ModelLoadError
from fdfo.model.loading import load_backbone
from tests.conftest import ROOT

PROMPTS, SEEDS = ["a red cube", "a cat on a mat"], [3, 4]
# Guidance 1 is no CFG for SD3; for FLUX the embedding's value (3.5 is its pipeline's default).
GUIDANCE = {"tiny": 1.0, "tiny-flux": 3.5}


def model(name):
    return load_backbone(name, torch.device("cpu"), torch.float32)


def images(backbone, name):
    return generate_images(backbone, PROMPTS, SEEDS, num_steps=4, guidance_scale=GUIDANCE[name], resolution=32,
                           max_sequence_length=32, batch_size=2)


def saved_lora(name, folder):
    """A LoRA of rank 4 with alpha 8 (scale 2, so a lost alpha shows) and B drawn away from zero, on the backbone's
    own targets, saved in `folder`."""
    backbone = model(name)
    lora = attach_lora(backbone.transformer, rank=4, alpha=8, targets=backbone.lora_targets)
    torch.manual_seed(0)
    for key, p in lora.named_parameters():
        if "lora_B" in key:
            p.data.normal_(0, 0.3)
    save_lora(lora, folder)
    return folder


@pytest.fixture(scope="module", params=["tiny", "tiny-flux"])
def checkpoint(request, tmp_path_factory):
    """(model, checkpoint folder) for each backbone."""
    return request.param, saved_lora(request.param, tmp_path_factory.mktemp("ckpt") / "epoch-0000001")


@pytest.fixture(scope="module")
def sd3_checkpoint(tmp_path_factory):
    return saved_lora("tiny", tmp_path_factory.mktemp("ckpt") / "epoch-0000001")


def test_exported_lora_loads_in_diffusers_and_gives_our_images(checkpoint, tmp_path):
    name, checkpoint = checkpoint
    subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(checkpoint), "--out",
                    str(tmp_path / "lora"), "--pretrained-model", name], cwd=ROOT, check=True)
    assert (tmp_path / "lora" / WEIGHT_NAME).is_file()

    ours = model(name)
    attach_lora_from(ours.transformer, checkpoint)
    theirs = model(name)
    theirs.pipe.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader of the pipeline's class
    assert isinstance(theirs.pipe, {"tiny": StableDiffusion3Pipeline, "tiny-flux": FluxPipeline}[name])
    base = images(model(name), name)
    mine, diffusers = images(ours, name), images(theirs, name)
    assert (mine.int() - base.int()).abs().float().mean() > 5  # the LoRA changes the images visibly
    assert torch.equal(mine, diffusers)


def test_export_needs_a_checkpoint_and_a_folder(sd3_checkpoint, tmp_path):
    checkpoint = sd3_checkpoint
    with pytest.raises(ConfigError, match="--checkpoint is required"):
        export(ExportConfig(out=tmp_path / "lora"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "file"))


def test_merged_transformer_gives_the_loras_images(checkpoint, tmp_path):
    name, checkpoint = checkpoint
    export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "lora", merged=True, pretrained_model=name))
    merged = model(name)
    merged.pipe.transformer = type(merged).transformer_class.from_pretrained(tmp_path / "lora" / "transformer")
    assert not any("lora" in key for key, _ in merged.transformer.named_parameters())
    ours = model(name)
    attach_lora_from(ours.transformer, checkpoint)
    mine, folded, base = images(ours, name), images(merged, name), images(model(name), name)
    # Folding B·A into W rounds differently from adding the two products (measured: the same uint8 images here).
    difference = (mine.int() - folded.int()).abs()
    print(f"merged vs LoRA: mean |difference| {difference.float().mean():.3f}, max {difference.max()} (of 255); "
          f"LoRA vs base {(mine.int() - base.int()).abs().float().mean():.1f}")
    assert difference.float().mean() < 0.1 and difference.max() <= 2


def test_the_merged_export_loads_no_pipeline_and_writes_nothing_without_its_base_model(sd3_checkpoint, tmp_path,
                                                                                       monkeypatch):
    checkpoint = sd3_checkpoint
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("the pipeline loaded"))
    # A real model's folder (the tiny one, saved in bf16 as SD3.5's is): only its transformer/ is read, and the
    # merged transformer is written in its dtype unless --dtype says otherwise.
    model("tiny").transformer.to(torch.bfloat16).save_pretrained(tmp_path / "base" / "transformer")
    (tmp_path / "base" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    for dtype, written in [("auto", torch.bfloat16), ("fp32", torch.float32)]:
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / dtype, merged=True, dtype=dtype,
                            pretrained_model=str(tmp_path / "base")))
        weights = safetensors.torch.load_file(tmp_path / dtype / "transformer" / "diffusion_pytorch_model.safetensors")
        assert {w.dtype for w in weights.values()} == {written}
    with pytest.raises(ConfigError, match="only --merged writes"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "other", dtype="fp16"))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json is missing, so this is not a diffusers pipeline"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "other", merged=True,
                            pretrained_model=str(tmp_path / "not-a-model")))  # an empty folder...
    (tmp_path / "not-a-model" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ModelLoadError, match="Could not load the base model's transformer"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "other", merged=True,
                            pretrained_model=str(tmp_path / "not-a-model")))  # ...or one without transformer/...
    assert not (tmp_path / "other").exists()  # ...and nothing written

