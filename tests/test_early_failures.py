"""Failures that used to come late, or as a traceback, now come first and as a sentence: a grid too large for its
format, a model folder that is not there, a Hub model, checkpoint or data set that is not in the cache offline,
DreamSim without its cache, a scorer that cannot load (before any image is generated), and the user's own scorer
that exits at import, is in the working folder, or raises."""

import os
import subprocess
import sys
import urllib.error

import pytest
import torch
from huggingface_hub import constants as hub_constants

from fdfo.cli import parse
from fdfo.config import ConfigError, GenerateConfig, MetricsConfig
from fdfo.errors import UserError
from fdfo.evaluation import protocol
from fdfo.evaluation.generate import generate
from fdfo.evaluation.grid import make_grid, planned_grid_size
from fdfo.evaluation.metrics import evaluate
from fdfo.hub_files import ModelLoadError, not_loaded
from fdfo.model.loading import load_backbone
from fdfo.rewards import Scorers, build_reward
from fdfo.rewards.registry import RewardSpecError, parse_terms
from fdfo.rewards.twins import random_clip
from fdfo.runs.checkpoint import CheckpointError
from fdfo.runs.hub import resolve_checkpoint
from tests.fake_hub import add_repo
from tests.conftest import ROOT

CPU = torch.device("cpu")
SD35M = "stabilityai/stable-diffusion-3.5-medium"


def must_not_run(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the failure was found")
    return fail


@pytest.fixture
def nothing_loads(monkeypatch):
    """generate.py and metrics.py stop with an AssertionError if they get as far as loading or generating."""
    for module in ("fdfo.evaluation.generate", "fdfo.evaluation.metrics"):
        monkeypatch.setattr(f"{module}.load_with_checkpoint", must_not_run("loading the pipeline"))
        monkeypatch.setattr(f"{module}.generate_images", must_not_run("generation"))


def assert_says_what_to_do(error: pytest.ExceptionInfo, repo: str, cache, download: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, UserError) and error.value.__cause__ is not None
    assert f"`{repo}`" in message and str(cache) in message, message
    assert "HF_HUB_OFFLINE is set" in message and "unset HF_HUB_OFFLINE" in message, message
    assert f"run `{download}" in message and "` on a machine online with the same HF_HOME" in message, message


def test_a_grid_larger_than_its_format_is_refused_before_anything_loads(tmp_path, nothing_loads, monkeypatch):
    monkeypatch.setattr("fdfo.evaluation.generate.weights_and_settings", must_not_run("resolving the checkpoint"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}: a red cube on a blue table\n" for i in range(64)))
    # 64 prompts × 2 columns of 512 px: 66,056 px wide, past libjpeg's 65,500.
    with pytest.raises(ConfigError) as error:
        generate(parse(GenerateConfig, ["--prompts", str(prompts), "--out", str(tmp_path / "grid.jpg")]))
    assert str(error.value).startswith("The grid of 64 prompts × 2×2 images of 512 px would be 66,056×")
    assert "a JPEG image is at most 65,500 px a side: give fewer prompts (at most 63), a smaller --grid-rows, " \
           f"--grid-cols or --resolution, or an --out ending in .png (--out {tmp_path / 'grid.png'})." in str(error.value)
    with pytest.raises(ConfigError, match="a WebP image is at most 16,383 px a side: give fewer prompts .at most 31."):
        generate(parse(GenerateConfig, ["--pretrained-model", "tiny", "--prompts", str(prompts), "--resolution", "256",
                                        "--out", str(tmp_path / "grid.webp")]))


def test_the_planned_grid_size_is_the_grids_own():
    prompts = ["a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed, " * 4, ""]
    for rows, cols, resolution in [(1, 1, 16), (2, 3, 32), (3, 1, 64)]:
        images = torch.zeros(len(prompts) * rows * cols, 3, resolution, resolution, dtype=torch.uint8)
        assert make_grid(images, prompts, rows, cols).size == planned_grid_size(prompts, rows, cols, resolution)


@pytest.mark.parametrize("name", ["./models/sd35", "/no/such/folder", "~/models/sd35", "models/sd35/transformer"])
def test_a_model_folder_that_is_not_there_is_a_sentence_before_anything_loads(name, nothing_loads, monkeypatch):
    monkeypatch.setattr("fdfo.evaluation.generate.weights_and_settings", must_not_run("resolving the checkpoint"))
    expected = r"is not a Hugging Face Hub id \(org/name\) either; give the folder of a diffusers SD3 or FLUX model"
    with pytest.raises(ModelLoadError, match=r"--pretrained-model .*: there is no folder .*, and it " + expected):
        generate(parse(GenerateConfig, ["--pretrained-model", name]))
    with pytest.raises(ModelLoadError, match="there is no folder"):
        evaluate(parse(MetricsConfig, ["--pretrained-model", name]))
    with pytest.raises(ModelLoadError, match="there is no folder"):  # train.py's and export.py's loader
        load_backbone(name, CPU, torch.float32)


@pytest.mark.parametrize("load,repo", [
    (lambda: load_backbone(SD35M, CPU, torch.float32), SD35M),
    (lambda: Scorers(CPU, None, purpose="metric").build("pickscore"), "yuvalkirstain/PickScore_v1"),
    (lambda: Scorers(CPU, None, purpose="metric").build("hpsv2"), "adams-story/HPSv2-hf"),
    (lambda: Scorers(CPU, None, purpose="metric").build("clip_l14"), "openai/clip-vit-large-patch14"),
    (lambda: Scorers(CPU, None, purpose="reward").build("vlm_alignment"), "Qwen/Qwen2.5-VL-7B-Instruct"),
    (lambda: Scorers(CPU, None, purpose="metric", vlm_model_name="qwenvl-3b").build("vlm_photo"),
     "Qwen/Qwen2.5-VL-3B-Instruct"),
])
def test_a_hub_model_missing_offline_names_its_repo_and_what_to_do(load, repo, empty_hub_cache):
    with pytest.raises(ModelLoadError) as error:
        load()
    assert_says_what_to_do(error, repo, empty_hub_cache, f"hf download {repo}")


def test_pickscores_clip_h_processor_missing_offline_is_named(empty_hub_cache, tmp_path):
    # The training reward reads PickScore's images through CLIP-H's processor, another repo: the cache has
    # PickScore's model alone.
    model, _ = random_clip()
    model.save_pretrained(tmp_path / "pickscore")
    add_repo(empty_hub_cache, "yuvalkirstain/PickScore_v1", tmp_path / "pickscore")
    with pytest.raises(ModelLoadError, match="the pickscore scorer's processor") as error:
        Scorers(CPU, None, purpose="reward").build("pickscore")
    repo = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert_says_what_to_do(error, repo, empty_hub_cache, f"hf download {repo}")


def test_online_the_sentence_says_what_needs_the_network(monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # no loader runs: only the sentence is built
    message = not_loaded("the hpsv2 scorer's model", "adams-story/HPSv2-hf", OSError("We couldn't connect.\nMore."))
    assert message.startswith("Could not load the hpsv2 scorer's model from the Hugging Face Hub repo "
                              "`adams-story/HPSv2-hf` (OSError: We couldn't connect). HF_HUB_OFFLINE is not set")
    assert "needs huggingface.co to be reachable; without internet, run `hf download adams-story/HPSv2-hf`" in message
    assert message.endswith("and set HF_HUB_OFFLINE=1.")


def test_a_scorer_that_cannot_load_fails_before_any_image_is_generated(empty_hub_cache, nothing_loads, monkeypatch):
    monkeypatch.setattr("fdfo.evaluation.metrics.prompt_set", lambda name, offline: ["a cat", "a dog"])
    with pytest.raises(ModelLoadError) as error:
        evaluate(parse(MetricsConfig, ["--pretrained-model", SD35M, "--num-prompts", "2", "--metrics", "pickscore"]))
    assert_says_what_to_do(error, "yuvalkirstain/PickScore_v1", empty_hub_cache,
                           "hf download yuvalkirstain/PickScore_v1")


def test_an_hf_checkpoint_missing_offline_names_repo_and_folder(empty_hub_cache, tmp_path):
    repo, folder = "nvidia/finite-difference-flow-optimization", "fdfo-combined-reward-no-cfg/epoch-0000100"
    with pytest.raises(ModelLoadError, match=f"Could not load the checkpoint `{folder}` from") as error:
        resolve_checkpoint(f"hf:{repo}/{folder}")
    assert_says_what_to_do(error, repo, empty_hub_cache, f"hf download {repo} --include '{folder}/*'")
    with pytest.raises(ModelLoadError, match=r"run `hf download nvidia/fdfo --include 'run-a/epoch-0000005/\*' "
                                             "--revision v1.0`"):
        resolve_checkpoint("https://huggingface.co/nvidia/fdfo/tree/v1.0/run-a/epoch-0000005")
    # The repo cached with another folder only: snapshot_download answers with the snapshot, without this folder.
    commit = "0" * 40
    (empty_hub_cache / "models--nvidia--fdfo" / "refs").mkdir(parents=True)
    (empty_hub_cache / "models--nvidia--fdfo" / "refs" / "main").write_text(commit)
    (empty_hub_cache / "models--nvidia--fdfo" / "snapshots" / commit / "run-a" / "epoch-0000001").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="There is no folder `run-b/epoch-0000001` in the Hugging Face cache's "
                                              r"copy of `nvidia/fdfo` \(revision main\); check the path on "
                                              "https://huggingface.co/nvidia/fdfo/tree/main, or unset HF_HUB_OFFLINE"):
        resolve_checkpoint("hf:nvidia/fdfo/run-b/epoch-0000001")


def test_the_hpdv2_download_failing_is_a_sentence(empty_hub_cache):
    with pytest.raises(ModelLoadError, match="Could not load the HPDv2 benchmark prompts") as error:
        protocol.prompt_set("hpdv2", offline=False)
    assert_says_what_to_do(error, "zhwang/HPDv2", empty_hub_cache,
                           "hf download zhwang/HPDv2 --repo-type dataset --include 'benchmark/anime.json'")


def test_dreamsim_without_its_cache_offline_is_a_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.set_dir, undone after the test

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torch.hub, "urlopen", offline)  # what DreamSim's downloads go through; nothing is fetched
    with pytest.raises(protocol.DreamSimLoadError) as error:
        protocol.load_dreamsim(CPU)
    message = str(error.value)
    assert message.startswith(f"Could not load DreamSim into {tmp_path / 'hub' / 'dreamsim'}, under torch's hub "
                              "folder (URLError: <urlopen error [Errno -2] Name or service not known>)")
    assert "github.com/ssundaram21/dreamsim" in message and "commit 7c446df" in message
    assert "with the same TORCH_HOME" in message and message.endswith("or leave dreamsim_diversity out.")
    assert torch.hub.get_dir() == str(tmp_path / "hub")


def test_a_scorer_module_that_exits_at_import_stops_train_py_in_a_sentence(tmp_path):
    # train.py started by its path from another folder: the module is in the working folder, not beside train.py.
    (tmp_path / "exiting_rewards.py").write_text("import sys\n\nsys.exit(0)\n\ndef score(images, prompts):\n    pass\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--pretrained-model", "tiny", "--reward",
                             "exiting_rewards:score=1", "--runs-dir", str(tmp_path / "runs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: Reward term `exiting_rewards:score`: importing `exiting_rewards` called "
                                    "sys.exit (exit code 0); a scorer's module must not exit when it is imported: "
                                    'put that code under `if __name__ == "__main__":`.'), result.stderr
    assert f'File "{tmp_path / "exiting_rewards.py"}", line 3, in <module>' in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_working_folder_is_searched_for_that_import_only(tmp_path, monkeypatch):
    (tmp_path / "here_rewards.py").write_text("def score(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    path = [folder for folder in sys.path if folder not in ("", str(tmp_path))]  # as under `python path/to/train.py`
    monkeypatch.setattr(sys, "path", list(path))
    monkeypatch.delitem(sys.modules, "here_rewards", raising=False)
    assert parse_terms(("here_rewards:score=2",)) == [("here_rewards:score", 2.0)]
    assert sys.path == path
    with pytest.raises(RewardSpecError, match=r"importing `not_here_rewards` failed \(ModuleNotFoundError: No module "
                                              f"named 'not_here_rewards'\\). It was looked for in the working folder "
                                              f"{tmp_path} and on PYTHONPATH."):
        parse_terms(("not_here_rewards:score",))


@pytest.mark.parametrize("module,body,raised", [
    ("raising_rewards", "raise KeyError('logits')", "KeyError: 'logits'"),
    ("exiting_scorer_rewards", "raise SystemExit(3)", "SystemExit: 3"),  # sys.exit(3)
])
def test_a_scorer_that_raises_names_its_term_and_shows_its_own_traceback(module, body, raised, tmp_path, monkeypatch):
    (tmp_path / f"{module}.py").write_text(
        f"def score(images, prompts):\n    return helper(images)\n\n\ndef helper(images):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward([(f"{module}:score", 1.0)], Scorers(CPU, "tiny", purpose="reward"))
    with pytest.raises(RewardSpecError) as error:
        reward(torch.rand(2, 3, 16, 16), ["a cat", "a dog"])
    sentence, traceback_text = str(error.value).split("\n", 1)
    assert sentence == f"The reward term `{module}:score` raised {raised}; fix the scorer and run again."
    assert traceback_text.startswith("Traceback of the scorer's code (most recent call last):")
    assert f'File "{tmp_path / f"{module}.py"}", line 2, in score' in traceback_text
    assert "line 6, in helper" in traceback_text and "fdfo/" not in traceback_text  # the user's frames only
    assert type(error.value.__cause__).__name__ == raised.split(":")[0]


def test_ctrl_c_in_a_scorer_is_not_turned_into_an_error(tmp_path, monkeypatch):
    (tmp_path / "slow_rewards.py").write_text("def score(images, prompts):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward([("slow_rewards:score", 1.0)], Scorers(CPU, "tiny", purpose="reward"))
    with pytest.raises(KeyboardInterrupt):
        reward(torch.rand(1, 3, 16, 16), ["a cat"])
