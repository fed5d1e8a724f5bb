"""The Hugging Face Hub (or the mirror HF_ENDPOINT names), through huggingface_hub: list a repository at a
revision, fetch its small files, and turn the Hub's refusals into errors a user can act on. The token
(TUNEFORGE_HF_TOKEN) goes to the Hub only: no message built here contains it.
"""

from __future__ import annotations

import errno
import fnmatch
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from app.core.config import Settings
from app.core.errors import APIError, InvalidRequest

# What a worker fetches of a model: safetensors weights, config, tokenizer and generation files.
WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "pytorch_model.bin.index.json")
SUPPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                 "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
# What the API host keeps in the database for token statistics at upload time.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Files treated as LFS by the Hub: their listing carries a sha256.
LFS_PATTERNS = (*WEIGHT_PATTERNS[:1], *PICKLE_PATTERNS[:3], "tokenizer.model")


class HubUnavailable(APIError):
    status_code = 502
    type = "server_error"


@dataclass
class RepoListing:
    """A repository at one commit: its files (name, size, sha256 of LFS files) and what its card says."""

    sha: str
    files: list[dict[str, Any]]
    license: str | None = None
    parameters: int | None = None
    gated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def token(settings: Settings) -> str | None:
    return settings.hf_token.get_secret_value() if settings.hf_token is not None else None


def wanted(name: str, *, allow_pickle: bool, trust_remote_code: bool) -> bool:
    """Whether a worker fetches this file of a model (top-level files only: subfolders hold other formats)."""
    patterns = (*WEIGHT_PATTERNS, *SUPPORT_FILES, *(PICKLE_PATTERNS if allow_pickle else ()),
                *(("*.py",) if trust_remote_code else ()))
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in patterns)


def has_safetensors(names: list[str]) -> bool:
    return any(fnmatch.fnmatch(n, WEIGHT_PATTERNS[0]) for n in names)


def has_pickle(names: list[str]) -> bool:
    return any(fnmatch.fnmatch(n, p) for n in names for p in PICKLE_PATTERNS[:3])


def hub_errors(repo: str, revision: str | None, *, param: str = "model") -> Any:
    """A context manager mapping huggingface_hub's errors to API errors naming what to do. `param`: the request
    field that named the repository ("source" for an operator's registration, "model" for a job's hub id; a
    worker's download answers no request, its message is what counts)."""
    from contextlib import contextmanager

    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    @contextmanager
    def mapped() -> Any:
        try:
            yield
        except GatedRepoError:
            raise InvalidRequest(
                f"The Hub repository {repo!r} is gated: accept its terms on the Hub with the account whose token "
                "the operator set in TUNEFORGE_HF_TOKEN (or set one).", param=param, code="model_gated") from None
        except RepositoryNotFoundError:
            raise InvalidRequest(
                f"No repository {repo!r} on the Hub, or it is private: check the id, or set TUNEFORGE_HF_TOKEN to a "
                "token that can read it.", param=param, code="model_not_available") from None
        except RevisionNotFoundError:
            raise InvalidRequest(f"The Hub repository {repo!r} has no revision {revision!r}.", param="revision",
                                 code="model_not_available") from None
        except (OfflineModeIsEnabled, LocalEntryNotFoundError):
            raise HubUnavailable(f"This host is offline (HF_HUB_OFFLINE=1) and {repo!r} is not in its cache.",
                                 code="hub_unavailable") from None
        except (HfHubHTTPError, OSError, httpx2.HTTPError) as exc:  # httpx2: huggingface_hub 2.x's transport errors
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise  # this host's disk, not the Hub
            raise HubUnavailable(f"The Hub could not be read for {repo!r}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                                 code="hub_unavailable") from None

    return mapped()


def list_repo(repo: str, revision: str | None, *, settings: Settings, param: str) -> RepoListing:
    """The repository's files at revision (default branch when None), pinned to the commit it resolves to; a
    refusal names `param` (hub_errors)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token(settings) or False)
    with hub_errors(repo, revision, param=param):
        info = api.model_info(repo, revision=revision, files_metadata=True)
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        files.append({"name": sibling.rfilename, "size": sibling.size if lfs is None else lfs.size,
                      "sha256": lfs.sha256 if lfs is not None else None,
                      "git_sha1": sibling.blob_id if lfs is None else None})
    card = info.card_data.to_dict() if info.card_data is not None else {}
    license_ = card.get("license") or next((t.removeprefix("license:") for t in info.tags or []
                                            if t.startswith("license:")), None)
    parameters = None
    if info.safetensors is not None:
        parameters = int(info.safetensors.total)
    assert info.sha is not None
    return RepoListing(sha=info.sha, files=files, license=license_, parameters=parameters,
                       gated=bool(info.gated))


def safetensors_tensors(repo: str, sha: str, names: list[str], *,
                        settings: Settings) -> list[tuple[str, list[int]]] | None:
    """Each tensor's name and shape in the weights a worker fetches (`names`' top-level safetensors files), from
    their headers: huggingface_hub reads the first 100 kB of each file with a range request, no weights. None when
    there are none, or a header cannot be read or parsed: the model is registered without its module names (what
    the listing gave stands)."""
    from concurrent.futures import ThreadPoolExecutor

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, SafetensorsParsingError

    api = HfApi(token=token(settings) or False)
    files = [n for n in names if "/" not in n and fnmatch.fnmatch(n, WEIGHT_PATTERNS[0])]
    if not files:
        return None
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            headers = list(pool.map(lambda name: api.parse_safetensors_file_metadata(repo, name, revision=sha),
                                    files))
    except (SafetensorsParsingError, HfHubHTTPError, OSError, httpx2.HTTPError):
        return None
    return [(name, list(tensor.shape)) for header in headers for name, tensor in header.tensors.items()]


def fetch_files(repo: str, sha: str, names: list[str], *, settings: Settings, param: str) -> dict[str, bytes]:
    """The bytes of some small files of the repository at commit sha; a refusal names `param` (hub_errors)."""
    from huggingface_hub import hf_hub_download

    found: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-hub-") as scratch, hub_errors(repo, sha, param=param):
        for name in names:
            path = hf_hub_download(repo, name, revision=sha, cache_dir=scratch, token=token(settings) or False)
            found[name] = Path(path).read_bytes()
    return found
