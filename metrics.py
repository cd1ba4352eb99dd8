"""The paper's evaluation metrics: `torchrun --nproc_per_node=N metrics.py --checkpoint CKPT --prompt-set ... --metrics ...`."""

from fdfo.signals import quiet_start

with quiet_start():  # Ctrl-C while torch and the models' libraries import: an exit without a traceback
    from fdfo.cli import main
    from fdfo.config import MetricsConfig
    from fdfo.evaluation.metrics import evaluate

if __name__ == "__main__":
    main(evaluate, MetricsConfig)
