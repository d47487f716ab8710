"""``python -m clues``."""

import sys

from clues.cli import main

sys.exit(main())
