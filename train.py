"""FDFO training: `python train.py [flags]` on one device, `torchrun --nproc_per_node=N train.py [flags]` on many."""

from fdfo.signals import quiet_start

with quiet_start():  # Ctrl-C while torch and the models' libraries import: an exit without a traceback
    from fdfo.cli import main
    from fdfo.config import TrainConfig
    from fdfo.harness.training_loop import train

if __name__ == "__main__":
    main(train, TrainConfig)
