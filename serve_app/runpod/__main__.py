"""``python -m serve_app.runpod``: the RunPod worker (the container command)."""

from __future__ import annotations

import sys

from serve_app.runpod.bootstrap import main

if __name__ == "__main__":
    sys.exit(main())
