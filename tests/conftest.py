import os
import tempfile

# Tests never touch the network or a W&B account.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One Inductor cache per ATEN_CPU_CAPABILITY (set before torch loads): kernels compiled under the machine's own
# AVX-512 and reused in a process run with ATEN_CPU_CAPABILITY=avx2 gave NaN velocities (torch 2.14.1); a
# cache of its own gives the right ones.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor-fdfo-tests-{os.environ.get('ATEN_CPU_CAPABILITY', 'default')}"))

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fdfo.model.sd3 import SD3  # noqa: E402
from fdfo.model.tiny import random_pipeline  # noqa: E402

# Two threads as on CI; FDFO_TEST_THREADS=1 checks that no result depends on the thread count.
torch.set_num_threads(int(os.environ.get("FDFO_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture
def tiny():
    """A fresh tiny SD3 model (fp32, CPU); building one takes well under a second."""
    return SD3(random_pipeline("tiny"))


ROOT = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, script: Path, *args: str) -> None:
    """Run `script` under torchrun with `nproc` gloo ranks (one thread each, offline); fail with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (conftest sets HF_HUB_OFFLINE=1): every Hub model is missing."""
    from huggingface_hub import constants as hub_constants
    assert hub_constants.is_offline_mode()
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))  # read at import; the loaders read this one
    return cache
