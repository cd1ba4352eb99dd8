"""A checkpoint's LoRA in diffusers' format: `python export.py --checkpoint CKPT --out FOLDER [--merged]`."""

from fdfo.signals import quiet_start

with quiet_start():  # Ctrl-C while torch and the models' libraries import: an exit without a traceback
    from fdfo.cli import main
    from fdfo.config import ExportConfig
    from fdfo.runs.export import export

if __name__ == "__main__":
    main(export, ExportConfig)
