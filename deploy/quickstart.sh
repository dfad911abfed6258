#!/usr/bin/env bash
# Install into .venv, fetch + verify the model named in the config (fails fast, one line, if it cannot),
# then serve it: OpenAI API on http://127.0.0.1:8000/v1, readiness on /ready, Ray dashboard on :8265.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-serve_config.yaml}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python -m serve_app.preflight "$CONFIG"
exec .venv/bin/serve run "$CONFIG"
