"""``python -m sparsert``: the command line (see :mod:`sparsert.cli`)."""

import sys

from .cli import main

sys.exit(main())
