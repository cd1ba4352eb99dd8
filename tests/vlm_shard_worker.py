"""torchrun worker for test_rewards: score with the tiny VLM sharded (FSDP2) over the ranks."""

import json
import sys

import torch

from fdfo import distributed
from fdfo.rewards.twins import random_qwen_vl
from fdfo.rewards.vlm import TRAIN_QUESTION, YesNoVlm

device = distributed.init()
vlm = YesNoVlm(*random_qwen_vl(), device, shard=True)
images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(distributed.rank()))
prompts = ["a cat", "an astronaut riding a horse on the moon, oil painting, highly detailed"]
scores = vlm.score(images, [TRAIN_QUESTION.format(prompt=p) for p in prompts], resize=504)
with open(f"{sys.argv[1]}.{distributed.rank()}.json", "w") as f:
    json.dump({"sharded": vlm.sharded, "scores": scores.tolist()}, f)
distributed.shutdown()
