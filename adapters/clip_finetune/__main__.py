"""`python -m adapters.clip_finetune ...` is the same as `clip-finetune ...`."""

import sys

from .cli.main import main

sys.exit(main())
