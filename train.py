"""`python train.py ...` is `python -m ladder_jax train ...`: see ladder_jax/cli/train.py."""

import os
import sys

from ladder_jax.cli.train import main

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
