"""Model download and cache on the shared model volume (no Ray imports here; see ``deployment.py``).

``ModelStore`` is the API the rest of the app uses; ``python -m serve_app.cache`` is the CLI.
"""

from serve_app.cache.results import CachedFile, CacheStatus
from serve_app.cache.store import ModelStore

__all__ = ["CacheStatus", "CachedFile", "ModelStore"]
