import os

# Tests never touch the network or a W&B account.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from fdfo.tiny import random_pipeline  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_pipe():
    """A fresh tiny SD3 pipeline (fp32, CPU); building one takes well under a second."""
    return random_pipeline("tiny")
