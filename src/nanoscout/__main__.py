"""``python -m nanoscout``: the same as the ``nanoscout`` command."""

import sys

from nanoscout.cli import main

sys.exit(main())
