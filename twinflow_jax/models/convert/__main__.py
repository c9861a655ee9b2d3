"""`python -m twinflow_jax.models.convert`: see `cli.py`."""

import sys

from twinflow_jax.models.convert.cli import main

if __name__ == '__main__':
  sys.exit(main())
