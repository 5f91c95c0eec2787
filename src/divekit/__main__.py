"""`python -m divekit` is the same as the `divekit` command."""

import sys

from divekit.cli import main

if __name__ == "__main__":
    sys.exit(main())
