"""Model references are validated before anything touches the network or the volume, and a filename, quant
pattern or split part always resolves to exactly one set of repo files (or a typed error that lists what exists);
a quant pattern picks the same model among local files as among a repo's files; only network trouble and
408/429/5xx answers count as transient.
"""

from __future__ import annotations

from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import HfHubHTTPError

from serve_app.cache.hub import RemoteFile, RepoListing, is_transient, select_files
from serve_app.cache.local import local_parts
from serve_app.cache.names import (
    glob_candidates,
    split_part_names,
    validate_filename,
    validate_repo_id,
    validate_revision,
)
from serve_app.errors import InvalidModelReferenceError, RemoteFileNotFoundError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def listing(*names: str) -> RepoListing:
    return RepoListing("acme/m", "main", COMMIT, {n: RemoteFile(n, 10, "0" * 64) for n in names})


@pytest.mark.parametrize("repo_id", ["acme/tiny-gguf", "a/b", "Org_1/Model.v2-GGUF", "bartowski/Llama-3.2-1B-Instruct-GGUF"])
def test_valid_repo_ids(repo_id: str) -> None:
    assert validate_repo_id(repo_id) == repo_id


@pytest.mark.parametrize(
    "repo_id", ["", "noslash", "a/b/c", "../etc", "acme/..", "acme/x..y", "acme/a--b", "-acme/x", "acme/x.", "a b/c",
                "acme/%2e%2e", "/abs/x", "acme\\x/y"],
)
def test_invalid_repo_ids(repo_id: str) -> None:
    with pytest.raises(InvalidModelReferenceError):
        validate_repo_id(repo_id)


@pytest.mark.parametrize("name", ["x.gguf", "sub/dir/x.gguf", "*Q4_K_M.gguf", "a..b.gguf"])
def test_valid_filenames(name: str) -> None:
    assert validate_filename(name) == name


@pytest.mark.parametrize(
    "name", ["", "../x.gguf", "/etc/passwd", "a/../../x.gguf", "a\\..\\x.gguf", "a//b.gguf", "./x.gguf", "x.gguf/",
             "a/./b", "x\x00.gguf", "..", "."],
)
def test_filenames_that_could_escape_are_refused(name: str) -> None:
    with pytest.raises(InvalidModelReferenceError):
        validate_filename(name)


def test_glob_refused_where_an_exact_name_is_required() -> None:
    with pytest.raises(InvalidModelReferenceError):
        validate_filename("*.gguf", allow_glob=False)


@pytest.mark.parametrize("revision", ["", "a/../b", "x\n"])
def test_invalid_revisions(revision: str) -> None:
    with pytest.raises(InvalidModelReferenceError):
        validate_revision(revision)


def test_split_part_names_from_any_part() -> None:
    expected = [f"m-Q4-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert split_part_names("m-Q4-00002-of-00003.gguf") == expected
    assert split_part_names("plain.gguf") == ["plain.gguf"]
    with pytest.raises(InvalidModelReferenceError):
        split_part_names("m-00004-of-00003.gguf")


def test_exact_file_and_pattern_select_one_file() -> None:
    repo = listing("m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md")
    assert [f.name for f in select_files(repo, "m-Q8_0.gguf")] == ["m-Q8_0.gguf"]
    assert [f.name for f in select_files(repo, "*Q4_K_M.gguf")] == ["m-Q4_K_M.gguf"]


def test_ambiguous_pattern_lists_candidates() -> None:
    repo = listing("m-Q4_K_M.gguf", "m-Q8_0.gguf")
    with pytest.raises(InvalidModelReferenceError) as info:
        select_files(repo, "*.gguf")
    assert "m-Q4_K_M.gguf" in info.value.message and "m-Q8_0.gguf" in info.value.message


def test_unmatched_pattern_and_missing_file_list_existing_gguf_files() -> None:
    repo = listing("m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md")
    for requested in ("*Q5_K_M*", "m-Q2_K.gguf"):
        with pytest.raises(RemoteFileNotFoundError) as info:
            select_files(repo, requested)
        assert "m-Q4_K_M.gguf, m-Q8_0.gguf" in info.value.message
        assert "README.md" not in info.value.message


def test_split_gguf_selects_every_part_first_part_first() -> None:
    parts = [f"big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    repo = listing(*reversed(parts), "big-Q8_0.gguf")
    assert [f.name for f in select_files(repo, parts[1])] == parts
    # A pattern matching all parts of one split set is one candidate, not three.
    assert [f.name for f in select_files(repo, "*Q4_K_M*.gguf")] == parts


def test_incomplete_split_gguf_names_missing_parts() -> None:
    repo = listing("big-00001-of-00003.gguf", "big-00003-of-00003.gguf")
    with pytest.raises(RemoteFileNotFoundError) as info:
        select_files(repo, "big-00001-of-00003.gguf")
    assert "big-00002-of-00003.gguf" in info.value.message


def test_transient_classification() -> None:
    assert is_transient(httpx2.ConnectError("refused"))
    assert is_transient(httpx2.ReadTimeout("slow"))
    assert is_transient(httpx2.RemoteProtocolError("dropped"))
    assert not is_transient(ValueError("bug"))
    assert not is_transient(InvalidModelReferenceError("bad"))


def test_local_and_hub_patterns_pick_the_same_model(tmp_path: Path) -> None:
    names = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    for pattern in ("*Q8_0.gguf", "big-*"):
        hub_pick = select_files(listing(*names), pattern)[0].name
        assert glob_candidates(names, pattern) == [hub_pick]
        assert local_parts(str(tmp_path / pattern))[0] == str(tmp_path / hub_pick)


def test_permanent_http_errors_are_not_transient() -> None:
    request = httpx2.Request("GET", "http://hub.invalid/x")
    for status, transient in ((404, False), (410, False), (400, False), (403, False), (429, True), (503, True)):
        err = HfHubHTTPError("x", response=httpx2.Response(status, request=request))
        assert is_transient(err) is transient, status
