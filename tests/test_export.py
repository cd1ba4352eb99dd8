import subprocess
import sys

import pytest
import safetensors.torch
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from fdfo.runs.export import WEIGHT_NAME, export
from fdfo.config import ConfigError, ExportConfig
from fdfo.evaluation.images import generate_images
from fdfo.model.lora import attach_lora, attach_lora_from, save_lora
from fdfo.hub_files import ModelLoadError
from fdfo.model.tiny import random_pipeline
from tests.conftest import ROOT

PROMPTS, SEEDS = ["a red cube", "a cat on a mat"], [3, 4]


def images(pipe):
    return generate_images(pipe, PROMPTS, SEEDS, num_steps=4, guidance_scale=1.0, resolution=32,
                           max_sequence_length=32, batch_size=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A LoRA of rank 4 with alpha 8 (scale 2, so a lost alpha shows) and B drawn away from zero."""
    lora = attach_lora(random_pipeline("tiny").transformer, rank=4, alpha=8)
    torch.manual_seed(0)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("ckpt") / "epoch-0000001"
    save_lora(lora, folder)
    return folder


def test_exported_lora_loads_in_diffusers_and_gives_our_images(checkpoint, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "export.py"), "--checkpoint", str(checkpoint), "--out",
                    str(tmp_path / "lora")], cwd=ROOT, check=True)
    assert (tmp_path / "lora" / WEIGHT_NAME).is_file()

    ours = random_pipeline("tiny")
    attach_lora_from(ours.transformer, checkpoint)
    theirs = random_pipeline("tiny")
    theirs.load_lora_weights(str(tmp_path / "lora"))
    base = images(random_pipeline("tiny"))
    mine, diffusers = images(ours), images(theirs)
    assert (mine.int() - base.int()).abs().float().mean() > 5  # the LoRA changes the images visibly
    assert torch.equal(mine, diffusers)


def test_export_needs_a_checkpoint_and_a_folder(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--checkpoint is required"):
        export(ExportConfig(out=tmp_path / "lora"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "file"))


def test_merged_transformer_gives_the_loras_images(checkpoint, tmp_path):
    export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "lora", merged=True, pretrained_model="tiny"))
    merged = random_pipeline("tiny")
    merged.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "lora" / "transformer")
    assert not any("lora" in name for name, _ in merged.transformer.named_parameters())
    ours = random_pipeline("tiny")
    attach_lora_from(ours.transformer, checkpoint)
    mine, folded, base = images(ours), images(merged), images(random_pipeline("tiny"))
    # Folding B·A into W rounds differently from adding the two products (measured: the same uint8 images here).
    difference = (mine.int() - folded.int()).abs()
    print(f"merged vs LoRA: mean |difference| {difference.float().mean():.3f}, max {difference.max()} (of 255); "
          f"LoRA vs base {(mine.int() - base.int()).abs().float().mean():.1f}")
    assert difference.float().mean() < 0.1 and difference.max() <= 2


def test_the_merged_export_loads_no_pipeline_and_writes_nothing_without_its_base_model(checkpoint, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("the pipeline loaded"))
    # A real model's folder (the tiny one, saved in bf16 as SD3.5's is): only its transformer/ is read, and the
    # merged transformer is written in its dtype unless --dtype says otherwise.
    random_pipeline("tiny").transformer.to(torch.bfloat16).save_pretrained(tmp_path / "base" / "transformer")
    for dtype, written in [("auto", torch.bfloat16), ("fp32", torch.float32)]:
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / dtype, merged=True, dtype=dtype,
                            pretrained_model=str(tmp_path / "base")))
        weights = safetensors.torch.load_file(tmp_path / dtype / "transformer" / "diffusion_pytorch_model.safetensors")
        assert {w.dtype for w in weights.values()} == {written}
    with pytest.raises(ConfigError, match="only --merged writes"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "other", dtype="fp16"))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelLoadError, match="Could not load the base model's transformer"):
        export(ExportConfig(checkpoint=str(checkpoint), out=tmp_path / "other", merged=True,
                            pretrained_model=str(tmp_path / "not-a-model")))  # a folder without transformer/...
    assert not (tmp_path / "other").exists()  # ...and nothing written

