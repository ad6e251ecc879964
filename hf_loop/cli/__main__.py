"""``python -m hf_loop.cli ...`` (and ``torchrun -m hf_loop.cli finetune ...``) run the ``hf-loop`` command."""

import sys

from hf_loop.cli import main

sys.exit(main())
