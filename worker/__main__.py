"""``python -m worker``: the GPU side's commands (see :mod:`worker.cli`)."""

import sys

from worker.cli import main

sys.exit(main())
