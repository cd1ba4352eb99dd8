"""The default commands on the real loading path: model ids as published, HF_HUB_OFFLINE=1, and a Hugging Face
cache (tests/fake_hub.py) of tiny random models under the real repo ids. Each command runs in a cache that holds
only what prefetch names for it, and prefetch names every file of those repos but the ones no loader reads: what
prefetch fetches is what the command loads."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from huggingface_hub import constants as hub_constants
from PIL import Image

from fdfo.cli import parse, parse_train_config
from fdfo.config import ExportConfig, GenerateConfig, MetricsConfig
from fdfo.evaluation.generate import generate
from fdfo.evaluation.metrics import evaluate
from fdfo.harness.training_loop import train
from fdfo.prefetch import fetch, needs, summary
from fdfo.runs.export import export
from tests.fake_hub import (FDFO_CHECKPOINTS, FLUX1DEV, HPDV2_PROMPTS, NOT_READ, PUBLISHED_RUN, SD35L, SD35M, add_repo,
                            build_fake_hub, snapshot_files)

PICKSCORE, CLIP_H, HPSV2, CLIP_L = ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                    "adams-story/HPSv2-hf", "openai/clip-vit-large-patch14")
QWEN, HPDV2 = "Qwen/Qwen2.5-VL-7B-Instruct", "zhwang/HPDv2"
IMAGE_REWARD, BERT, HPSV3, QWEN2 = ("THUDM/ImageReward", "google-bert/bert-base-uncased", "MizzenAI/HPSv3",
                                    "Qwen/Qwen2-VL-7B-Instruct")
PROCESSOR_FILES = {"config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"}
RUN = f"hf:{FDFO_CHECKPOINTS}/{PUBLISHED_RUN}"
FAST = ["--num-solver-steps", "2"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """The whole fake Hub, as a cache (built once: ~10 s)."""
    return build_fake_hub(tmp_path_factory.mktemp("fake-hub") / "hub")


def use_cache(monkeypatch, cache: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # read at import; the loaders read this one


def prefetched(hub: Path, command: str, args: list[str], monkeypatch) -> dict[str, set[str]]:
    """Repo → the files prefetch names for `command args`, listed from the fake Hub."""
    use_cache(monkeypatch, hub)
    found = needs(command, args)
    fetched = {files.repo_id: set(files.files()) for files in found.hub}
    assert len(fetched) == len(found.hub)  # each repo once
    return fetched


def cache_of(hub: Path, files: dict[str, set[str]], cache: Path) -> Path:
    """A cache holding only `files` of the fake Hub's repos (the checkpoints' repo whole: its own test below)."""
    everything = snapshot_files(hub)
    files = {**files, FDFO_CHECKPOINTS: everything[FDFO_CHECKPOINTS]}
    for repo, names in files.items():
        repo_type = "dataset" if repo == HPDV2 else "model"
        snapshot = next((hub / f"{repo_type}s--{repo.replace('/', '--')}" / "snapshots").iterdir())
        staging = cache.parent / "staging" / repo
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / name, staging / name)
        add_repo(cache, repo, staging, repo_type)
    return cache


def all_read(hub: Path, repo: str) -> set[str]:
    """Every file of a fake repo but those of the real repo that nothing reads."""
    return snapshot_files(hub)[repo] - set(NOT_READ.get(repo, ()))


def sd35m_files(hub):
    return {SD35M: all_read(hub, SD35M)}


def preference_models(hub):
    """ImageReward's two files and BERT's tokenizer; HPSv3's weights with Qwen2-VL's configs and processor."""
    return {IMAGE_REWARD: all_read(hub, IMAGE_REWARD), BERT: all_read(hub, BERT), HPSV3: all_read(hub, HPSV3),
            QWEN2: all_read(hub, QWEN2)}


@pytest.mark.parametrize("reward,scorers", [
    (["--reward-preset", "pickscore"], lambda hub: {PICKSCORE: all_read(hub, PICKSCORE), CLIP_H: PROCESSOR_FILES}),
    (["--reward-preset", "vlm_alignment"], lambda hub: {QWEN: all_read(hub, QWEN)}),
    ([], lambda hub: {PICKSCORE: all_read(hub, PICKSCORE), CLIP_H: PROCESSOR_FILES, QWEN: all_read(hub, QWEN)}),
    (["--reward", "image_reward=1", "hpsv3=0.5"], preference_models),
], ids=["pickscore", "vlm_alignment", "combined", "image_reward+hpsv3"])
def test_training_each_preset_reads_what_prefetch_fetches(hub, tmp_path, monkeypatch, reward, scorers):
    args = [*reward, "--prompt-file", "prompt_sets/demo.txt", "--runs-dir", str(tmp_path / "runs"),
            "--num-epochs", "2", "--total-pairs-per-epoch", "2", "--gradient-steps-per-epoch", "1", "--save-freq", "2",
            "--sample.num-solver-steps", "2", "--sample.max-sequence-length", "32"]
    files = prefetched(hub, "train.py", args, monkeypatch)
    # The pipeline's folders, not SD3.5's single-file checkpoints; PickScore's model with CLIP-H's processor
    # alone (the published reward's), .safetensors where a repo also has .bin.
    assert files == {**sd35m_files(hub), **scorers(hub)}
    use_cache(monkeypatch, cache_of(hub, files, tmp_path / "hf" / "hub"))
    run = train(parse_train_config(args))
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log if row["kind"] == "epoch"] == [0, 1]
    assert (run / "checkpoints" / "epoch-0000002" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("model", [SD35L, FLUX1DEV])
def test_the_other_backbones_train_from_their_hub_ids_reading_what_prefetch_fetches(model, hub, tmp_path, monkeypatch):
    # The repos' own layouts (FLUX.1-dev's single-file flux1-dev.safetensors and ae.safetensors beside its
    # pipeline folders are not read), tiny random models inside.
    args = ["--pretrained-model", model, "--reward-preset", "pickscore", "--prompt-file", "prompt_sets/demo.txt",
            "--runs-dir", str(tmp_path / "runs"), "--num-epochs", "1", "--total-pairs-per-epoch", "2",
            "--gradient-steps-per-epoch", "1", "--sample.num-solver-steps", "2", "--sample.resolution", "64",
            "--sample.max-sequence-length", "32"]
    files = prefetched(hub, "train.py", args, monkeypatch)
    assert files == {model: all_read(hub, model), PICKSCORE: all_read(hub, PICKSCORE), CLIP_H: PROCESSOR_FILES}
    assert not set(NOT_READ[model]) & files[model]
    use_cache(monkeypatch, cache_of(hub, files, tmp_path / "hf" / "hub"))
    run = train(parse_train_config(args))
    assert (run / "checkpoints" / "epoch-0000001" / "adapter_model.safetensors").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["pretrained_model"] == model
    export(parse(ExportConfig, ["--checkpoint", str(run), "--out", str(tmp_path / "lora"), "--pretrained-model",
                                model]))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_generate_from_hf_a_hub_url_and_a_local_published_folder(hub, tmp_path, monkeypatch):
    url = f"https://huggingface.co/{FDFO_CHECKPOINTS}/tree/main/{PUBLISHED_RUN}/epoch-0000050"
    files = prefetched(hub, "generate.py", ["--checkpoint", RUN], monkeypatch)
    assert files == sd35m_files(hub)
    use_cache(monkeypatch, cache_of(hub, files, tmp_path / "hf" / "hub"))
    local = tmp_path / PUBLISHED_RUN  # a published run downloaded by hand: <run>/epoch-*/
    shutil.copytree(next((hub / f"models--{FDFO_CHECKPOINTS.replace('/', '--')}" / "snapshots").iterdir())
                    / PUBLISHED_RUN, local)
    grids = {}
    for name, checkpoint in [("hf", RUN), ("url", url), ("local", str(local)), ("local-100", str(local / "epoch-0000100"))]:
        out = generate(parse(GenerateConfig, ["--checkpoint", checkpoint, "--out", str(tmp_path / f"{name}.png"),
                                              "--grid-rows", "1", "--grid-cols", "1", *FAST]))
        grids[name] = torch.tensor(list(Image.open(out).getdata()))
    # The run is its newest epoch, from the Hub and locally alike; epoch 50 is another LoRA.
    assert torch.equal(grids["hf"], grids["local"]) and torch.equal(grids["hf"], grids["local-100"])
    assert not torch.equal(grids["hf"], grids["url"])


def test_metrics_on_hpdv2_reads_what_prefetch_fetches(hub, tmp_path, monkeypatch):
    metrics = ["pickscore", "hpsv2", "image_reward", "hpsv3", "clip_h14", "clip_l14", "vlm_alignment", "vlm_quality",
               "vlm_photo"]
    args = ["--checkpoint", RUN, "--num-prompts", "4", "--metrics", *metrics, "--out", str(tmp_path / "m.json"), *FAST]
    files = prefetched(hub, "metrics.py", args, monkeypatch)
    hpdv2 = {f"benchmark/{style}.json" for style in HPDV2_PROMPTS}
    assert files == {**sd35m_files(hub), HPDV2: hpdv2, **preference_models(hub),
                     **{repo: all_read(hub, repo) for repo in (PICKSCORE, HPSV2, CLIP_H, CLIP_L, QWEN)}}
    use_cache(monkeypatch, cache_of(hub, files, tmp_path / "hf" / "hub"))
    report = evaluate(parse(MetricsConfig, args))
    assert set(report["results"]) == set(metrics) and report["num_prompts"] == 4
    assert all(result["count"] == 4 for result in report["results"].values())
    assert report["config"]["prompt_set"] == "hpdv2"  # FDFO's protocol, from the checkpoint's method
    assert not (Path(__file__).parent.parent / "prompt_sets" / "hpdv2.json").exists()  # nothing in the checkout


def test_export_plain_and_merged_from_the_hub(hub, tmp_path, monkeypatch):
    assert prefetched(hub, "export.py", ["--checkpoint", RUN, "--out", str(tmp_path / "plain")], monkeypatch) == {}
    merged = ["--checkpoint", RUN, "--out", str(tmp_path / "merged"), "--merged"]
    files = prefetched(hub, "export.py", merged, monkeypatch)
    assert files == {SD35M: {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"}}
    use_cache(monkeypatch, cache_of(hub, files, tmp_path / "hf" / "hub"))
    export(parse(ExportConfig, ["--checkpoint", RUN, "--out", str(tmp_path / "plain")]))
    export(parse(ExportConfig, merged))
    assert (tmp_path / "plain" / "pytorch_lora_weights.safetensors").is_file()
    weights = safetensors.torch.load_file(tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # the base model's stored dtype


def test_prefetch_fetches_and_sums_up_offline_from_the_cache(hub, monkeypatch, capsys):
    use_cache(monkeypatch, hub)
    found = needs("metrics.py", ["--checkpoint", RUN, "--metrics", "pickscore", "dreamsim_diversity",
                                 "--num-repeats", "2"])
    assert found.dreamsim and found.checkpoint == RUN
    found.dreamsim = False  # DreamSim's weights come from GitHub, not from this cache
    fetched = fetch(found)
    assert [what.split(" ")[0] for what, _, _ in fetched] == [SD35M, HPDV2, PICKSCORE, RUN]
    sizes = {what.split(" ")[0]: size for what, _, size in fetched}
    snapshot = next((hub / f"models--{SD35M.replace('/', '--')}" / "snapshots").iterdir())
    assert sizes[SD35M] == sum((snapshot / f).stat().st_size for f in all_read(hub, SD35M))
    assert "in all; set HF_HUB_OFFLINE=1" in summary(fetched)


def test_online_only_the_named_files_are_downloaded(hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import HfApi
    from fdfo.model.loading import pipeline_files
    files = snapshot_files(hub)[SD35M]
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda self, repo, repo_type, revision: sorted(files))
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: asked.append(kwargs) or "/nowhere")
    assert str(pipeline_files(SD35M).local()) == "/nowhere"
    assert asked == [dict(repo_type="model", revision="main", allow_patterns=sorted(all_read(hub, SD35M)))]
