"""``python -m lungddpm``: the command line (:mod:`lungddpm.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
