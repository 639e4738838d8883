"""`python -m m3_jax.cli ...` is the same as `m3-jax ...`."""

import sys

from m3_jax.cli.main import main

sys.exit(main())
