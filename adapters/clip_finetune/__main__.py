"""`python -m adapters.clip_finetune ...` is the same as `clip-finetune ...`."""

from .cli.main import run

run()
