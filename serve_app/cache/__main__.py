"""Entry point of ``python -m serve_app.cache`` (see ``cli.py``)."""

import sys

from serve_app.cache.cli import main

if __name__ == "__main__":
    sys.exit(main())
