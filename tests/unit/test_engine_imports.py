"""Importing the engine package, or naming any of its types, never loads llama_cpp: only creating a model or an
engine does (processes that never run a model, and tests of the layers above, stay light)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_importing_the_engine_package_does_not_load_llama_cpp() -> None:
    r = _run('import serve_app.engine, sys; assert "llama_cpp" not in sys.modules')
    assert r.returncode == 0, r.stderr


def test_naming_every_engine_type_does_not_load_llama_cpp() -> None:
    r = _run(
        "import sys\n"
        "from serve_app.engine import *\n"
        "from serve_app.engine import Engine, EngineRequest, EngineStats, LlamaModelHandle, LoadReport, RequestStream\n"
        "import serve_app.engine.plan, serve_app.engine.device, serve_app.engine.text, serve_app.engine.step\n"
        "assert 'llama_cpp' not in sys.modules, 'loaded'\n"
        "from serve_app.engine.llama import lib\n"
        "lib()\n"
        "assert 'llama_cpp' in sys.modules\n"
    )
    assert r.returncode == 0, r.stderr
