"""``python -m vaelab`` and ``torchrun -m vaelab``: the command line."""

import sys

from vaelab.cli import main

sys.exit(main())
