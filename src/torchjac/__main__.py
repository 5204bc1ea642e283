"""``python -m torchjac``: the same as the ``torchjac`` command."""

import sys

from torchjac.cli import main

if __name__ == "__main__":
    sys.exit(main())
