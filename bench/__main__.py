"""``python -m bench [--quick | --full] [--only NAME ...] [--json PATH]``."""

import sys

from bench.runner import main

sys.exit(main())
