"""`python -m ladder_jax VERB ...`: see ladder_jax/cli/__init__.py."""

import sys

from .cli import main

sys.exit(main())
