"""``python -m bench.accuracy ...``: see :mod:`bench.accuracy.run`."""

import sys

from bench.accuracy.run import main

if __name__ == "__main__":
    sys.exit(main())
