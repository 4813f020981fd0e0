"""`python infer.py ...` is `python -m ladder_jax infer ...`: see ladder_jax/cli/infer.py."""

import os
import sys

from ladder_jax.cli.infer import main

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
