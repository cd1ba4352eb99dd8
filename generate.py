"""Image grids from a checkpoint (ours or the published ones): `python generate.py --checkpoint CKPT --out out.jpg`."""

from fdfo.signals import quiet_start

with quiet_start():  # Ctrl-C while torch and the models' libraries import: an exit without a traceback
    from fdfo.cli import main
    from fdfo.config import GenerateConfig
    from fdfo.evaluation.generate import generate

if __name__ == "__main__":
    main(generate, GenerateConfig)
