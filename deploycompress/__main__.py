"""``python -m deploycompress``: the same command as the ``deploycompress`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
