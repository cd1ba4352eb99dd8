"""Damaged or foreign LoRA folders are one sentence before the base model loads (generate, metrics, export);
LoRA weights holding NaN or ±inf are refused wherever a LoRA loads; an export --out that cannot be written is
refused before any work."""

import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file

from fdfo.cli import main
from fdfo.config import ConfigError, ExportConfig, GenerateConfig, MetricsConfig
from fdfo.evaluation.generate import generate
from fdfo.evaluation.metrics import evaluate
from fdfo.model.lora import (LORA_TARGETS, LoraLoadError, attach_lora, attach_lora_from, check_lora_folder, load_lora,
                             lora_config, save_lora)
from fdfo.model.tiny import random_pipeline
from fdfo.runs.checkpoint import CheckpointError
from fdfo.runs.export import WEIGHT_NAME, export

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FIRST = "transformer_blocks.0.attn.add_k_proj"  # the first module of the tiny transformer's LoRA, by name


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A rank-4 LoRA folder of the tiny transformer, as training saves one."""
    folder = tmp_path_factory.mktemp("good") / "epoch-0000001"
    save_lora(attach_lora(random_pipeline("tiny").transformer, rank=4, alpha=8), folder)
    return folder


def damaged_copy(good, tmp_path, damage):
    folder = tmp_path / "epoch-0000001"
    shutil.copytree(good, folder)
    damage(folder)
    return folder


def config_with(**changes):
    """A damage: adapter_config.json with `changes` (None removes the setting)."""
    def damage(folder):
        config = json.loads((folder / CONFIG).read_text())
        config.update(changes)
        (folder / CONFIG).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return damage


def weights_with(change):
    """A damage: adapter_model.safetensors holding change(its tensors)."""
    def damage(folder):
        save_file(change(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    return damage


def write(name, data):
    return lambda folder: (folder / name).write_bytes(data(folder / name))


def header_claiming_a_megabyte(path):
    return struct.pack("<Q", 10**6) + path.read_bytes()[8:]  # the header's length field, past the file's end


def rank(r):
    """Every LoRA matrix pair rebuilt at rank `r` (zeros)."""
    return lambda state: {k: torch.zeros((r, v.shape[1]) if ".lora_A." in k else (v.shape[0], r))
                          for k, v in state.items()}


DAMAGES = {  # name: (damage, the damaged file, what the sentence says)
    "no config": (lambda f: (f / CONFIG).unlink(), "", f"is not a LoRA checkpoint folder: {CONFIG} missing"),
    "no weights": (lambda f: (f / WEIGHTS).unlink(), "", f"is not a LoRA checkpoint folder: {WEIGHTS} missing"),
    "config not JSON": (write(CONFIG, lambda p: b'{"r": 4,'), CONFIG, "is not JSON"),
    "config not UTF-8": (write(CONFIG, lambda p: b"\xff\xfe\x00r"), CONFIG, "is not JSON"),
    "config not a table": (write(CONFIG, lambda p: b"[4, 8]"), CONFIG, "holds a JSON list, not a table of settings"),
    "no target_modules": (config_with(target_modules=None), CONFIG, "gives target_modules None, not a list"),
    "empty target_modules": (config_with(target_modules=[]), CONFIG, "gives target_modules [], not a list"),
    "target pattern not a regex": (config_with(target_modules="attn.(to_q"), CONFIG, "not a regular expression"),
    "targets matching nothing": (config_with(target_modules=["proj_mlp"]), WEIGHTS,
                                 f"holds base_model.model.{FIRST}.lora_A.weight, which is not the lora_A or lora_B "
                                 f"weight of a module that {CONFIG}'s target_modules names"),
    "a target without weights": (config_with(target_modules=[*LORA_TARGETS, "ff.net.0.proj"]), CONFIG,
                                 f"names target_modules that no weight of {WEIGHTS} belongs to (ff.net.0.proj)"),
    "r disagreeing with the weights": (config_with(r=8), WEIGHTS, f"holds {FIRST}'s lora_A of shape [4, 32] and "
                                       f"lora_B of shape [32, 4], while {CONFIG} gives rank 8"),
    "absurd r": (config_with(r=10**9), CONFIG, "gives r 1000000000, not a LoRA rank (a whole number from 1 to 4096)"),
    "zero r": (config_with(r=0), CONFIG, "gives r 0, not a LoRA rank"),
    "r as text": (config_with(r="4"), CONFIG, "gives r '4', not a LoRA rank"),
    "r above the modules' width": (lambda f: (config_with(r=40)(f), weights_with(rank(40))(f)), CONFIG,
                                   f"gives rank 40, above the width of {FIRST} (32 in, 32 out)"),
    "NaN alpha": (config_with(lora_alpha=float("nan")), CONFIG, "gives lora_alpha nan, not a finite number"),
    "no alpha": (config_with(lora_alpha=None), CONFIG, "gives lora_alpha None, not a finite number"),
    "empty weights file": (write(WEIGHTS, lambda p: b""), WEIGHTS, "cannot be read as safetensors (Error while "
                                                                   "deserializing header: header too small)"),
    "truncated weights": (write(WEIGHTS, lambda p: p.read_bytes()[:-100]), WEIGHTS,
                          "cannot be read as safetensors (Error while deserializing header: incomplete metadata, "
                          "file not fully covered)"),
    "truncated header": (write(WEIGHTS, lambda p: p.read_bytes()[:40]), WEIGHTS, "cannot be read as safetensors"),
    "random bytes": (write(WEIGHTS, lambda p: torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                                            dtype=torch.uint8).numpy().tobytes()),
                     WEIGHTS, "cannot be read as safetensors"),
    "header longer than the file": (write(WEIGHTS, header_claiming_a_megabyte), WEIGHTS,
                                    "cannot be read as safetensors (Error while deserializing header: invalid header "
                                    "length)"),
    "no tensors": (weights_with(lambda state: {}), WEIGHTS, "holds no LoRA weights"),
    "a weight that is not LoRA's": (weights_with(lambda state: {**state, "base_model.model.proj_out.weight":
                                                                torch.zeros(4)}), WEIGHTS,
                                    "holds base_model.model.proj_out.weight, which is not the lora_A or lora_B weight"),
    "lora_A without lora_B": (weights_with(lambda state: {k: v for k, v in state.items() if k !=
                                                          f"base_model.model.{FIRST}.lora_B.weight"}), WEIGHTS,
                              f"holds the lora_A of {FIRST} without its lora_B"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_or_foreign_folder_is_one_sentence_naming_the_file(case, good, tmp_path):
    damage, name, says = DAMAGES[case]
    folder = damaged_copy(good, tmp_path, damage)
    with pytest.raises(LoraLoadError) as refused:
        check_lora_folder(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / name} "), message
    assert says in message and "\n" not in message, message
    assert message.endswith(("copy it again or pick another checkpoint.", "or its run folder.")), message


def test_sound_folders_pass(good, tmp_path):
    check_lora_folder(good)
    # Per-module ranks (rank_pattern) and a target pattern are PEFT's too: checked and loaded as PEFT reads them.
    ranks, pattern = lora_config(4, 8), lora_config(4, 8)
    ranks.rank_pattern, pattern.target_modules = {"to_q": 8}, r".*\.attn\.(to_q|add_k_proj)"
    for name, config in [("ranks", ranks), ("pattern", pattern)]:
        get_peft_model(random_pipeline("tiny").transformer, config).save_pretrained(tmp_path / name)
        check_lora_folder(tmp_path / name)
        attach_lora_from(random_pipeline("tiny").transformer, tmp_path / name)
    assert load_file(tmp_path / "ranks" / WEIGHTS)["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"
                                                   ].shape[0] == 8


def test_a_sound_lora_of_modules_the_model_lacks_is_a_sentence(good, tmp_path):
    def elsewhere(folder):  # one LoRA pair on a module the SD3 transformer does not have
        config_with(target_modules=["conv_in"])(folder)
        save_file({"base_model.model.conv_in.lora_A.weight": torch.zeros(4, 32),
                   "base_model.model.conv_in.lora_B.weight": torch.zeros(32, 4)}, folder / WEIGHTS)
    folder = damaged_copy(good, tmp_path, elsewhere)
    check_lora_folder(folder)
    with pytest.raises(LoraLoadError, match=r"The LoRA in .* does not fit this model \(Target modules .*conv_in.* not "
                                             r"found in the base model.*\)\. Check that it was trained on the same base"):
        attach_lora_from(random_pipeline("tiny").transformer, folder)


def run(entry, cls, args, capsys):
    """(exit code, stderr) of the entry point run in-process."""
    with pytest.raises(SystemExit) as stop:
        main(entry, cls, args)
    return stop.value.code, capsys.readouterr().err


@pytest.fixture
def no_base_model(monkeypatch):
    """Loading the base model fails the test: the LoRA folder must be refused before it."""
    def load_base_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before the LoRA folder was checked")
    monkeypatch.setattr("fdfo.evaluation.images.load_backbone", load_base_model)
    monkeypatch.setattr("fdfo.runs.export.load_transformer", load_base_model)


@pytest.mark.parametrize("entry,cls,out,flags,case", [
    (generate, GenerateConfig, "grid.png", [], "truncated weights"),
    (evaluate, MetricsConfig, "metrics.json", ["--num-prompts", "2"], "config not a table"),
    # Without the check, this one is exported into a file that diffusers rejects.
    (export, ExportConfig, "lora", ["--merged"], "r disagreeing with the weights"),
])
def test_entry_points_refuse_a_damaged_folder_before_loading_the_base_model(entry, cls, out, flags, case, good,
                                                                           tmp_path, capsys, no_base_model):
    damage, name, says = DAMAGES[case]
    folder, out = damaged_copy(good, tmp_path, damage), tmp_path / out
    code, err = run(entry, cls, ["--pretrained-model", "tiny", "--checkpoint", str(folder), "--out", str(out),
                                 *flags], capsys)
    assert code == 2 and err.startswith(f"error: {folder / name} ") and says in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.fixture
def non_finite(good, tmp_path):
    """A checkpoint whose LoRA diverged: two NaN and an inf in two lora_B matrices."""
    def poison(state):
        b = sorted(k for k in state if ".lora_B." in k)
        state[b[0]][0, :2], state[b[1]][1, 1] = float("nan"), float("inf")
        return state
    return damaged_copy(good, tmp_path, weights_with(poison))


def test_non_finite_weights_are_refused_where_a_lora_loads(non_finite, tmp_path, capsys):
    says = (f"The LoRA in {non_finite} holds 3 non-finite values (in 2 of its tensors, e.g. base_model.model.{FIRST}"
            ".lora_B.weight): it cannot be used; pick an earlier checkpoint.")
    check_lora_folder(non_finite)  # its header is sound: the values are only seen where the weights are read
    with pytest.raises(LoraLoadError) as refused:
        load_lora(attach_lora(random_pipeline("tiny").transformer, rank=4, alpha=8), non_finite)
    assert str(refused.value) == says
    code, err = run(generate, GenerateConfig, ["--pretrained-model", "tiny", "--checkpoint", str(non_finite),
                                               "--out", str(tmp_path / "grid.png")], capsys)
    assert (code, err) == (2, f"error: {says}\n") and not (tmp_path / "grid.png").exists()
    code, err = run(export, ExportConfig, ["--checkpoint", str(non_finite), "--out", str(tmp_path / "lora")], capsys)
    assert (code, err) == (2, f"error: {says}\n") and not (tmp_path / "lora").exists()


@pytest.mark.parametrize("place", ["under a file", "in /proc", "on a read-only mount", "a file"])
def test_an_export_out_that_cannot_be_written_is_refused_before_any_work(place, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    out, says = {
        "under a file": (tmp_path / "file" / "lora", "cannot be written (Not a directory)"),
        "in /proc": (Path("/proc/fdfo/lora"), "cannot be written (No such file or directory)"),
        "on a read-only mount": (tmp_path / "lora", "cannot be written (Read-only file system)"),
        "a file": (tmp_path / "file", f"--out {tmp_path / 'file'} is a file; give a folder."),
    }[place]
    if place == "on a read-only mount":  # what the kernel answers there (root included), without mounting one
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    # A checkpoint that does not exist: an --out checked after resolving it would give another error.
    with pytest.raises(ConfigError) as refused:
        export(ExportConfig(checkpoint=str(tmp_path / "no-checkpoint"), out=out))
    message = str(refused.value)
    assert message.startswith(f"--out {out} ") and says in message, message
    assert place == "a file" or message.endswith("choose another folder."), message


def test_the_out_probe_leaves_nothing_behind_and_export_writes_there(good, tmp_path):
    out = tmp_path / "new" / "lora"
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        export(ExportConfig(checkpoint=str(tmp_path / "no-checkpoint"), out=out))
    assert not (tmp_path / "new").exists()  # the probe's folders are gone when the export fails after it
    assert export(ExportConfig(checkpoint=str(good), out=out)) == out / WEIGHT_NAME
    assert [p.name for p in out.iterdir()] == [WEIGHT_NAME]
