"""``python -m mpigls`` is the ``mpigls`` command."""

import sys

from mpigls.cli import main

if __name__ == "__main__":
    sys.exit(main())
