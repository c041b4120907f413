"""``python -m sdkit.training ...``: see ``sdkit.training.cli``."""

import sys

from .cli import main

sys.exit(main())
