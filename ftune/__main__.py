"""``python -m ftune``: the ``ftune`` command."""

import sys

from ftune.cli import main

sys.exit(main())
