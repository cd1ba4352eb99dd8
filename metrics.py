"""The paper's evaluation metrics: `torchrun --nproc_per_node=N metrics.py --checkpoint CKPT --prompt-set ... --metrics ...`."""

from fdfo.cli import main
from fdfo.config import MetricsConfig
from fdfo.evaluation.metrics import evaluate

if __name__ == "__main__":
    main(evaluate, MetricsConfig)
