"""``python -m benchmarks [options]``: the same as ``torchjac bench [options]``."""

import sys

from torchjac.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
