"""``python -m worker.simulator``: the same as ``sequin-worker simulate``."""

import sys

from worker.simulator import main

sys.exit(main())
