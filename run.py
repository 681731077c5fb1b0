"""Entry point: `python run.py --help`."""

import sys

from grok.cli import main

if __name__ == "__main__":
    sys.exit(main())
