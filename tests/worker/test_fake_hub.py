"""The fake Hub speaks the protocol the installed huggingface_hub reads: the real client against it, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.fake_hub import FakeHub, FakeRepo, git_blob_sha1, pickle_only, repo_from_dir

MAIN = "1" * 40
OLD = "2" * 40
WEIGHTS = os.urandom(200_000)
CONFIG = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
TOKENIZER = json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode()
FILES = {"config.json": CONFIG, "tokenizer.json": TOKENIZER, "model.safetensors": WEIGHTS,
         "README.md": b"# tiny\n"}


def _safetensors(shapes: dict[str, list[int]]) -> bytes:
    header = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]} for name, shape in shapes.items()}
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    repos = [
        FakeRepo("org/tiny", dict(FILES), revisions={"main": MAIN, "v1.0": MAIN, "v0.9": OLD}, license="apache-2.0"),
        FakeRepo("org/gated", dict(FILES), gated=True),
        FakeRepo("org/flaky", dict(FILES), drop_after={"model.safetensors": 50_000}),
        FakeRepo("org/counted", {"config.json": CONFIG, "model.safetensors": _safetensors({"w": [4, 8], "b": [8]})}),
    ]
    with FakeHub(repos, tree_page_size=2) as fake:
        fake.patch_env(monkeypatch)
        yield fake


def test_model_info_gives_the_sha_sizes_and_lfs_sha256(hub: FakeHub) -> None:
    info = HfApi(endpoint=hub.url, token=False).model_info("org/tiny", revision="v1.0", files_metadata=True)

    assert info.id == "org/tiny" and info.sha == MAIN and info.gated is False
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(FILES)
    assert siblings["config.json"].size == len(CONFIG)
    assert siblings["config.json"].blob_id == git_blob_sha1(CONFIG) and siblings["config.json"].lfs is None
    lfs = siblings["model.safetensors"].lfs
    assert lfs is not None and lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest() and lfs.size == len(WEIGHTS)
    assert siblings["model.safetensors"].size == len(WEIGHTS)
    assert info.card_data is not None and info.card_data.to_dict()["license"] == "apache-2.0"
    assert "license:apache-2.0" in (info.tags or [])
    assert info.safetensors is None
    assert ("GET", "/api/models/org/tiny/revision/v1.0?blobs=true") in hub.requests


def test_repo_info_default_branch_and_safetensors_parameters(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    assert api.repo_info("org/tiny").sha == MAIN
    assert api.repo_info("org/tiny", revision=OLD).sha == OLD
    info = api.model_info("org/counted")
    assert info.safetensors is not None and info.safetensors.total == 40
    assert info.siblings is not None and info.siblings[0].size is None


def test_tree_listing_is_paginated(hub: FakeHub) -> None:
    files = list(HfApi(endpoint=hub.url, token=False).list_repo_tree("org/tiny", recursive=True, revision=MAIN))

    assert sorted(f.path for f in files) == sorted(FILES)
    tree_calls = [path for method, path in hub.requests if "/tree/" in path]
    assert len(tree_calls) == 2 and "cursor=2" in tree_calls[1]


@pytest.mark.parametrize("revision", ["v1.0", MAIN])
def test_snapshot_download_fetches_exactly_the_allowed_files(hub: FakeHub, tmp_path: Path, revision: str) -> None:
    folder = snapshot_download("org/tiny", revision=revision, allow_patterns=["*.json", "*.safetensors"],
                               cache_dir=tmp_path, token=False, endpoint=hub.url)

    assert Path(folder) == tmp_path / "models--org--tiny" / "snapshots" / MAIN
    fetched = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
    assert fetched == {name: data for name, data in FILES.items() if name != "README.md"}
    assert hub.downloads("org/tiny", "README.md") == 0
    assert all(hub.downloads("org/tiny", name) == 1 for name in fetched)
    resolved_tag = ("GET", "/api/models/org/tiny/revision/v1.0") in hub.requests
    assert resolved_tag == (revision == "v1.0")
    if revision == "v1.0":
        assert (tmp_path / "models--org--tiny" / "refs" / "v1.0").read_text() == MAIN


def test_snapshot_download_to_a_local_dir(hub: FakeHub, tmp_path: Path) -> None:
    folder = snapshot_download("org/tiny", revision=MAIN, allow_patterns=["config.json"], local_dir=tmp_path / "m",
                               cache_dir=tmp_path / "cache", token=False, endpoint=hub.url)

    assert Path(folder) == tmp_path / "m"
    assert (tmp_path / "m" / "config.json").read_bytes() == CONFIG
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_file_metadata_headers(hub: FakeHub) -> None:
    lfs = get_hf_file_metadata(hf_hub_url("org/tiny", "model.safetensors", revision="v1.0", endpoint=hub.url))
    assert (lfs.commit_hash, lfs.etag, lfs.size) == (MAIN, hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS))
    plain = get_hf_file_metadata(hf_hub_url("org/tiny", "config.json", revision=OLD, endpoint=hub.url))
    assert (plain.commit_hash, plain.etag, plain.size) == (OLD, git_blob_sha1(CONFIG), len(CONFIG))
    assert plain.xet_file_data is None


def test_range_requests_get_206(hub: FakeHub) -> None:
    url = f"{hub.url}/org/tiny/resolve/main/model.safetensors"
    response = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert response.status_code == 206 and response.content == WEIGHTS[100:200]
    assert response.headers["Content-Range"] == f"bytes 100-199/{len(WEIGHTS)}"
    assert httpx.get(url, headers={"Range": "bytes=-10"}).content == WEIGHTS[-10:]
    assert httpx.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416


def test_gated_repo_needs_the_token(hub: FakeHub, tmp_path: Path) -> None:
    assert HfApi(endpoint=hub.url, token=False).model_info("org/gated").gated == "auto"
    with pytest.raises(GatedRepoError) as no_token:
        snapshot_download("org/gated", cache_dir=tmp_path / "a", token=False, endpoint=hub.url)
    assert no_token.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as wrong_token:
        hf_hub_download("org/gated", "config.json", cache_dir=tmp_path / "b", token="hf_other", endpoint=hub.url)
    assert wrong_token.value.response.status_code == 403

    folder = snapshot_download("org/gated", cache_dir=tmp_path / "c", token=hub.token, endpoint=hub.url)
    assert (Path(folder) / "model.safetensors").read_bytes() == WEIGHTS


def test_unknown_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(RepositoryNotFoundError) as repo_error:
        api.model_info("org/missing")
    assert not isinstance(repo_error.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=tmp_path, token=hub.token, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/tiny", revision="v9", cache_dir=tmp_path, token=False, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/tiny", revision="f" * 40, cache_dir=tmp_path, token=False, endpoint=hub.url)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/tiny", "missing.json", cache_dir=tmp_path, token=False, endpoint=hub.url)


def test_dropped_connection_is_refetched_whole_within_the_call(hub: FakeHub, tmp_path: Path) -> None:
    """The body is read in 10 MiB chunks: a 200 KB file cut after 50 KB yielded none, so the in-call retry
    (http_get, after 1 s) is a full GET without Range, and the call succeeds."""
    path = hf_hub_download("org/flaky", "model.safetensors", cache_dir=tmp_path, token=False, endpoint=hub.url)

    assert Path(path).read_bytes() == WEIGHTS
    assert hub.downloads("org/flaky", "model.safetensors") == 2 and hub.ranges == []
    assert not list(tmp_path.rglob("*.incomplete"))


def test_dropped_connection_resumes_with_range_after_a_full_chunk(hub: FakeHub, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a chunk has been written, the in-call retry asks for the rest from the last chunk boundary."""
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 16_384)
    folder = snapshot_download("org/flaky", cache_dir=tmp_path, token=False, endpoint=hub.url)

    assert (Path(folder) / "model.safetensors").read_bytes() == WEIGHTS
    assert hub.downloads("org/flaky", "model.safetensors") == 2
    assert [spec for _, spec in hub.ranges] == ["bytes=49152-"]
    assert not list(tmp_path.rglob("*.incomplete"))


def test_patch_env_points_the_default_endpoint_here(hub: FakeHub, tmp_path: Path) -> None:
    assert os.environ["HF_ENDPOINT"] == hub.url and hf_constants.HF_HUB_DISABLE_XET
    path = hf_hub_download("org/tiny", "config.json", cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == CONFIG


def test_repo_from_dir_and_pickle_only(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name, data in {**FILES, "sub/extra.txt": b"x"}.items():
        (tmp_path / name).write_bytes(data)
    repo = repo_from_dir("org/dir", tmp_path, license="mit")
    assert repo.files["sub/extra.txt"] == b"x" and repo.license == "mit" and len(repo.revisions["main"]) == 40

    pickled = pickle_only(repo)
    assert "model.safetensors" not in pickled.files and "pytorch_model.bin" in pickled.files
    assert pickled.revisions["main"] != repo.revisions["main"] and "model.safetensors" in repo.files
    with FakeHub([pickled]) as fake:
        info = HfApi(endpoint=fake.url, token=False).model_info("org/dir", files_metadata=True)
    weights = next(s for s in info.siblings or [] if s.rfilename == "pytorch_model.bin")
    assert weights.lfs is not None and info.sha == pickled.revisions["main"]
