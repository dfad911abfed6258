"""Model reference names: validation, split GGUF part names and quant patterns (no I/O, no network).

One home for the naming rules, shared by Hub references (``hub.py``), local paths (``local.py``) and the manifest
schema (``manifest.py``): a name that passes here cannot leave its directory once joined to a path.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from serve_app.errors import InvalidModelReferenceError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Hub rules: alnum plus - _ . ; no leading/trailing - or . ; no "--" or ".."; 96 chars per component.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_RE = re.compile(rf"^{_NAME}/{_NAME}$")
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$")
_GLOB_CHARS = frozenset("*?[")


def is_glob(name: str) -> bool:
    return any(c in _GLOB_CHARS for c in name)


def validate_repo_id(repo_id: str) -> str:
    if not _REPO_RE.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise InvalidModelReferenceError(
            f"Invalid repo id {repo_id!r}: expected 'owner/name' using letters, digits, '-', '_' and '.'",
            param="repo_id",
        )
    return repo_id


def validate_filename(name: str, *, allow_glob: bool = True) -> str:
    """A repo-relative path that cannot name anything outside its directory once joined."""
    bad = (
        not name
        or len(name) > 1024
        or name.startswith("/")
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or any(seg in ("", ".", "..") for seg in name.split("/"))
        or (not allow_glob and is_glob(name))
    )
    if bad:
        raise InvalidModelReferenceError(
            f"Invalid filename {name!r}: use a relative path inside the repo (no '..', no leading '/', no '\\')",
            param="filename",
        )
    return name


def validate_revision(revision: str) -> str:
    if not revision or len(revision) > 256 or ".." in revision or any(ord(c) < 32 for c in revision):
        raise InvalidModelReferenceError(f"Invalid revision {revision!r}", param="revision")
    return revision


def split_part_names(name: str) -> list[str]:
    """All part names of a split GGUF (``x-00001-of-00003.gguf``), first part first; ``[name]`` otherwise."""
    m = SPLIT_RE.match(name)
    if not m:
        return [name]
    total = int(m.group("total"))
    if total < 1 or not 1 <= int(m.group("index")) <= total:
        raise InvalidModelReferenceError(f"Invalid split GGUF part name {name!r}", param="filename")
    return [f"{m.group('stem')}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def glob_candidates(names: Iterable[str], pattern: str) -> list[str]:
    """The distinct models ``pattern`` matches among ``names`` (case-sensitive ``fnmatch``), sorted; the parts of
    one split GGUF count as one candidate, named by its first part. The caller decides what 0 or 2+ mean."""
    matches = (n for n in names if fnmatch.fnmatchcase(n, pattern))
    return sorted({split_part_names(n)[0] if SPLIT_RE.match(n) else n for n in matches})


def names_hint(names: list[str], limit: int = 20) -> str:
    """A short, bounded list of names for an error message."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
