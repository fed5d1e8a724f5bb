"""The model registry: base models jobs may name, as rows of `registered_models`.

A model is a Hub repository pinned to the commit its revision resolved to (`hf:ORG/NAME`), or a local folder
every worker host carries (`path:/folder`). Registering one reads what the API needs without the weights
(config, tokenizer files, the file list with sizes and hashes); workers fetch the weights themselves
(worker/model_cache.py). The JSON catalogue (TUNEFORGE_CATALOGUE_FILE / TUNEFORGE_MODEL_CATALOGUE) is a
bootstrap: its entries are imported as `path:` models when a process first looks models up.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
import struct
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import CatalogueError, Settings
from app.core.db import hold_rows
from app.core.errors import Conflict, InvalidRequest, NotFound
from app.models import FineTuningJob, RegisteredModel
from app.models.job import UNFINISHED_STATUSES, JobStatus
from app.models.registered_model import DOWNLOAD_STALE_SECONDS, MODEL_STATUSES, USABLE_STATUSES
from app.services import hub

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@-]{0,254}")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}
# Model types whose checkpoints name each weight as the module transformers builds holds it: none of them is in
# transformers' checkpoint conversion mapping, which renames or fuses other types' weights as they load
# (tests/worker/test_module_names.py checks it against the installed transformers). target_modules is checked
# against these models' names at job creation; other models' are left to the worker.
CHECKPOINT_NAMED_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "olmo",
    "olmo2", "granite", "cohere", "cohere2", "starcoder2", "stablelm", "gpt2", "smollm3", "glm4",
})
# A safetensors header longer than this is no header (an unfetched git-LFS pointer reads as ~2.3e18 bytes).
MAX_HEADER_BYTES = 100 * 2**20
# Config keys some decoder-only types' config.json writes under other names: transformers reads them through each
# config class's `attribute_map` (GPT2Config's in transformers/models/gpt2/configuration_gpt2.py, ...), which this
# table copies for the keys describe() reads; tests/worker/test_module_names.py holds it to the installed
# transformers, for every causal-LM type there with such names (encoder-decoder types' are left out: their aliases
# name the encoder).
_GPT2_KEYS = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "max_position_embeddings": "n_positions"}
CONFIG_KEY_ALIASES: dict[str, dict[str, str]] = {
    **{model_type: _GPT2_KEYS for model_type in ("gpt2", "gpt_bigcode", "gptj", "codegen", "gpt-sw3", "openai-gpt",
                                                 "ctrl")},
    "bloom": {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"},
    "dbrx": {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
             "max_position_embeddings": "max_seq_len"},
    "gpt_neo": {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"},
    **{model_type: {"max_position_embeddings": "model_max_length"} for model_type in ("bailing_hybrid", "kimi_linear")},
    "mpt": {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"},
    "rwkv": {"max_position_embeddings": "context_length"},
    "xglm": {"hidden_size": "d_model", "num_hidden_layers": "num_layers", "num_attention_heads": "attention_heads"},
}

# Model types whose positions come from a fixed table of max_position_embeddings rows (learned: the GPT-2 family,
# GPT-Neo, OPT, BioGPT, OpenAI GPT; CTRL's sinusoids are precomputed so): a row past it indexes beyond the table, an
# IndexError in the worker. Rotary and ALiBi models run past their trained length (worse, not broken): no limit.
LEARNED_POSITION_TYPES = frozenset({"gpt2", "gpt_bigcode", "gpt-sw3", "gpt_neo", "opt", "biogpt", "openai-gpt",
                                    "ctrl"})

logger = logging.getLogger("tuneforge.models")


def source_allowed(source: str, settings: Settings) -> bool:
    return any(fnmatch.fnmatchcase(source, glob.strip()) for glob in settings.model_sources.split(",") if glob.strip())


def check_name(name: str) -> None:
    """A model name jobs can give and the admin routes can address; InvalidRequest saying why not."""
    if NAME.fullmatch(name) is None or name.startswith("ft:") or name.endswith("/pull"):
        raise InvalidRequest(f"Invalid model name {name!r}: letters, digits and ._/@- (not starting with ft: nor "
                             "ending with /pull).",
                             param="name", code="invalid_value")


def normalise_source(source: str) -> str:
    """"hf:ORG/NAME" or "path:/absolute/folder"; a bare ORG/NAME is a hub id."""
    if source.startswith("path:"):
        folder = source.removeprefix("path:")
        if not Path(folder).is_absolute():
            raise InvalidRequest("A path: source must be an absolute folder on the worker hosts.", param="source",
                                 code="invalid_value")
        return f"path:{Path(folder)}"
    repo = source.removeprefix("hf:")
    if HUB_ID.fullmatch(repo) is None:
        raise InvalidRequest(f"Invalid source {source!r}: use hf:ORG/NAME (a Hub repository) or path:/folder.",
                             param="source", code="invalid_value")
    return f"hf:{repo}"


def describe(config: dict[str, Any], *, tokenizer: dict[str, str], files: list[dict[str, Any]],
             tensors: list[tuple[str, list[int]]] | None, parameters: int | None,
             license_: str | None) -> dict[str, Any]:
    """What jobs and the estimate need to know of a model, from its config.json, files and safetensors headers
    (`tensors`: each tensor's name and shape; None when there are none to read)."""
    text = config.get("text_config")
    if not isinstance(text, dict) or not text:
        text = config
    model_type = str(text.get("model_type") or config.get("model_type"))
    aliases = CONFIG_KEY_ALIASES.get(model_type, {})

    def count(key: str) -> int | None:  # a config.json is the model author's: a value of another type is unknown
        value = text.get(aliases.get(key, key), text.get(key))
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    if parameters is None and tensors:
        parameters = sum(math.prod(shape) for _, shape in tensors)
    dtype = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
    dtype = dtype if isinstance(dtype, str) else None
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures \
        and isinstance(architectures[0], str) else None
    weights = sum(int(f["size"] or 0) for f in files if hub.wanted(f["name"], allow_pickle=True,
                                                                   trust_remote_code=False)
                  and not f["name"].endswith((".json", ".txt", ".model", ".jinja")))
    if parameters is None and weights and dtype in DTYPE_BYTES:
        parameters = weights // DTYPE_BYTES[dtype]
    tokenizer_config = json.loads(tokenizer.get("tokenizer_config.json") or "{}")  # an object: _texts checked it
    return {"architecture": architecture, "parameters": parameters,
            "hidden_size": count("hidden_size"), "layers": count("num_hidden_layers"),
            "vocab_size": count("vocab_size"), "context_length": count("max_position_embeddings"),
            "intermediate_size": count("intermediate_size"), "attention_heads": count("num_attention_heads"),
            "kv_heads": count("num_key_value_heads") or count("num_attention_heads"),
            "torch_dtype": dtype, "bytes": sum(int(f["size"] or 0) for f in files),
            "has_chat_template": bool(tokenizer_config.get("chat_template")) or "chat_template.jinja" in tokenizer,
            "license": license_, "modules": weight_modules(tensors) if tensors and names_modules(config) else None,
            # The most positions a row may use (jobs' max_seq_length): known for learned positions only.
            "position_limit": count("max_position_embeddings") if model_type in LEARNED_POSITION_TYPES else None}


def names_modules(config: dict[str, Any]) -> bool:
    """Whether the model's checkpoint names are the names of the modules transformers builds from it: its type is
    one of CHECKPOINT_NAMED_TYPES (transformers renames others' weights as it loads them, or fuses them)."""
    return config.get("model_type") in CHECKPOINT_NAMED_TYPES


def weight_modules(tensors: list[tuple[str, list[int]]]) -> list[str]:
    """The names target_modules can give (a module's last name, as PEFT matches it): every module holding a
    tensor of two or more dimensions (linear, embedding and convolution weights, 4-bit and GPTQ packings too;
    norms and biases have one), and lm_head, which a causal LM always has (a tied one has no tensor of its own)."""
    names = {module.rpartition(".")[2] for name, shape in tensors if len(shape) >= 2
             for module in [name.rpartition(".")[0]] if module}
    return sorted(names | {"lm_head"})


def folder_tensors(folder: Path) -> list[tuple[str, list[int]]] | None:
    """Each tensor's name and shape from the folder's safetensors headers (8-byte length, then JSON): no tensor
    is read. None when there are none, or a header does not parse."""
    tensors = []
    try:
        for weights in sorted(folder.glob("*.safetensors")):
            with weights.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > min(MAX_HEADER_BYTES, weights.stat().st_size - 8):
                    return None
                header = json.loads(f.read(length))
            tensors += [(name, [int(d) for d in tensor["shape"]]) for name, tensor in header.items()
                        if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    return tensors or None


def _unreadable(where: str, name: str, problem: str, *, param: str) -> InvalidRequest:
    return InvalidRequest(f"{name} in {where} {problem}: transformers could not load the model (save_pretrained "
                          "writes the file afresh).", param=param, code="model_not_available")


def _texts(where: str, raw: dict[str, bytes], *, param: str) -> tuple[dict[str, Any], dict[str, str]]:
    """config.json as a JSON object, and the tokenizer files' text, from the model's bytes; InvalidRequest naming
    the file that is not UTF-8, or whose JSON does not parse or is no object (transformers reads each as one)."""
    texts = {}
    for name, data in raw.items():
        try:
            texts[name] = data.decode()
        except UnicodeDecodeError:
            raise _unreadable(where, name, "is not UTF-8 text", param=param) from None
    parsed = {}
    for name in ("config.json", *[n for n in hub.TOKENIZER_FILES if n.endswith(".json") and n in texts]):
        try:
            parsed[name] = json.loads(texts[name])
        except json.JSONDecodeError as exc:
            raise _unreadable(where, name, f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                              param=param) from None
        if not isinstance(parsed[name], dict):
            raise _unreadable(where, name, "is not a JSON object", param=param)
    return parsed["config.json"], {n: texts[n] for n in hub.TOKENIZER_FILES if n in texts}


def _read_folder(row: RegisteredModel, *, param: str = "source") -> None:
    folder = Path(row.local_path or "")
    if not (folder / "config.json").is_file():
        raise InvalidRequest(f"{folder} has no config.json: a path: model is a folder with a transformers model.",
                             param=param, code="model_not_available")
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise InvalidRequest(f"{folder} cannot be read ({exc.strerror}): every worker host must be able to read it.",
                             param=param, code="model_not_available") from None
    if not hub.has_safetensors(names) and not (row.allow_pickle and hub.has_pickle(names)):
        raise InvalidRequest(_pickle_message(row.name), param=param, code="model_not_available")
    raw: dict[str, bytes] = {}
    for name in ("config.json", *hub.TOKENIZER_FILES):
        try:
            if name in names:
                raw[name] = (folder / name).read_bytes()
        except OSError as exc:
            raise _unreadable(str(folder), name, f"cannot be read ({exc.strerror})", param=param) from None
    config, tokenizer = _texts(str(folder), raw, param=param)
    # Assigned once all is read: a folder that fails keeps no half of what it had.
    row.files = [{"name": n, "size": (folder / n).stat().st_size, "sha256": None, "git_sha1": None} for n in names
                 if hub.wanted(n, allow_pickle=row.allow_pickle, trust_remote_code=row.trust_remote_code)]
    row.tokenizer = tokenizer
    row.info = describe(config, tokenizer=row.tokenizer, files=row.files, tensors=folder_tensors(folder),
                        parameters=None, license_=None)


def _pickle_message(name: str) -> str:
    return (f"{name!r} has only pickle weights (.bin/.pt), which run code when loaded; register it with "
            "allow_pickle true if you trust it, or use a repository with safetensors weights.")


def _read_hub(row: RegisteredModel, settings: Settings, *, param: str) -> None:
    repo = row.hub_repo or ""
    listing = hub.list_repo(repo, row.revision, settings=settings, param=param)
    names = [f["name"] for f in listing.files]
    if not hub.has_safetensors(names) and not (row.allow_pickle and hub.has_pickle(names)):
        raise InvalidRequest(_pickle_message(repo), param=param, code="model_not_available")
    if "config.json" not in names:
        raise InvalidRequest(f"The Hub repository {repo!r} has no config.json: not a transformers model.",
                             param=param, code="model_not_available")
    small = hub.fetch_files(repo, listing.sha, ["config.json", *[n for n in hub.TOKENIZER_FILES if n in names]],
                            settings=settings, param=param)
    config, row.tokenizer = _texts(f"the Hub repository {repo!r} at {listing.sha}", small, param=param)
    row.commit_sha = listing.sha
    row.files = [f for f in listing.files
                 if hub.wanted(f["name"], allow_pickle=row.allow_pickle, trust_remote_code=row.trust_remote_code)]
    # The headers give the module names, kept for the types whose names they are (the listing gives the parameters).
    tensors = hub.safetensors_tensors(repo, listing.sha, [f["name"] for f in row.files], settings=settings) \
        if names_modules(config) else None
    row.info = describe(config, tokenizer=row.tokenizer, files=row.files, tensors=tensors,
                        parameters=listing.parameters, license_=listing.license)


def register(session: Session, *, settings: Settings, name: str, source: str, revision: str | None = None,
             trust_remote_code: bool = False, allow_pickle: bool = False, owned_by: str = "tuneforge",
             check_allowed: bool = True, source_param: str = "source") -> RegisteredModel:
    """Register a base model and read it (a hub model: pinned to the commit its revision resolves to).
    `source_param`: the request field that named the source, which refusals of it name ("model" for a job's hub id)."""
    source = normalise_source(source)
    check_name(name)
    if check_allowed and not source_allowed(source, settings):
        raise InvalidRequest(f"Source {source!r} is not allowed here (TUNEFORGE_MODEL_SOURCES is "
                             f"{settings.model_sources!r}).", param=source_param, code="model_source_not_allowed")
    if revision is not None and source.startswith("path:"):
        raise InvalidRequest("revision applies to hf: sources only.", param="revision", code="invalid_value")
    taken = Conflict(f"A model named {name!r} is already registered; remove it first to register it again.",
                     param="name", code="model_exists")
    if session.scalar(select(RegisteredModel.pk).where(RegisteredModel.name == name)) is not None:
        raise taken
    row = RegisteredModel(name=name, source=source, revision=revision, trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle, status="registered", info={}, files=[], tokenizer={},
                          owned_by=owned_by)
    if row.hub_repo is not None:
        _read_hub(row, settings, param=source_param)  # registered: a worker host fetches the weights when needed
    else:
        _read_folder(row, param=source_param)
        row.status = "ready"  # every worker host carries the folder: nothing to fetch
    try:
        with session.begin_nested():  # a concurrent registration of the name (its Hub reads take seconds) won
            session.add(row)
    except IntegrityError:
        raise taken from None
    return row


def import_catalogue(session: Session, *, settings: Settings) -> None:
    """Register the JSON catalogue's entries that the table lacks. A folder that cannot be read is kept in
    `error` with the reason (jobs on it fail at once with it) and read again on later lookups."""
    catalogue = {}
    try:
        listed = settings.catalogue()
    except CatalogueError as exc:  # what is registered stays usable; the file's entries wait for it to be mended
        _skip_catalogue_entry(str(exc))
        listed = dict(settings.model_catalogue)
    for name, entry in listed.items():
        try:
            check_name(name)
        except InvalidRequest as exc:  # no row: one that no job or admin route can name would only clutter
            _skip_catalogue_entry(f"{exc.message} Rename it in the catalogue.")
            continue
        catalogue[name] = entry
    if not catalogue:
        return
    rows = {r.name: r for r in session.scalars(select(RegisteredModel).where(RegisteredModel.name.in_(catalogue)))}
    pending = [name for name in catalogue if name not in rows or
               (rows[name].status == "error" and rows[name].source == _catalogue_source(catalogue[name].path))]
    if not pending:
        return
    for name in pending:
        entry, source = catalogue[name], _catalogue_source(catalogue[name].path)
        nested = session.begin_nested()
        try:
            row = rows.get(name) or RegisteredModel(name=name, source=source, trust_remote_code=entry.trust_remote_code,
                                                    allow_pickle=False, owned_by=entry.owned_by)
            try:
                _read_folder(row)
                row.status, row.error = "ready", None
            except InvalidRequest as exc:
                row.status, row.error = "error", exc.message
                row.info, row.files, row.tokenizer = row.info or {}, row.files or [], row.tokenizer or {}
            session.add(row)
            session.flush()
            nested.commit()
        except IntegrityError:  # another process imported it first
            nested.rollback()
    session.commit()  # bootstrap rows stand on their own, whatever the caller's request does next


# The catalogue entries skipped in this process, each logged once: every model lookup imports the catalogue.
_skipped_entries: set[str] = set()


def _skip_catalogue_entry(reason: str) -> None:
    if reason not in _skipped_entries:
        _skipped_entries.add(reason)
        logger.warning("Model catalogue entries skipped: %s", reason)


def _catalogue_source(path: str) -> str:
    return f"path:{Path(path).absolute()}"


def list_models(session: Session, *, settings: Settings,
                statuses: Collection[str] = MODEL_STATUSES) -> list[RegisteredModel]:
    import_catalogue(session, settings=settings)
    query = select(RegisteredModel).where(RegisteredModel.status.in_(statuses)).order_by(RegisteredModel.name)
    return list(session.scalars(query))


def revision_of(row: RegisteredModel) -> str:
    """Which weights a registration names: its source and the commit it is pinned to. A name registered again for
    other weights gets another; a fine-tuned model keeps the one it was trained on (FineTuningJob.base_revision)."""
    return f"{row.source}@{row.commit_sha or ''}"


def registered_again(base_revision: str | None, row: RegisteredModel) -> bool:
    """Whether a job's base name registers other weights now than its base_revision, kept when it was created (jobs
    from before base_revision: not known, so not)."""
    return base_revision is not None and base_revision != revision_of(row)


def check_trained_on(job: FineTuningJob, row: RegisteredModel, *, model: str) -> None:
    """400 model_not_available when `model` (a fine-tuned model of `job`) was trained on other weights than its base's
    name is registered for now: an adapter fits only the weights it was trained on."""
    if registered_again(job.base_revision, row):
        assert job.base_revision is not None
        raise InvalidRequest(f"{model} was trained on {job.base_model!r} as {job.base_revision}; that name now "
                             f"registers {revision_of(row)}, which its weights do not fit: register "
                             f"{job.base_revision.rpartition('@')[0]} as {job.base_model!r} again to use it.",
                             param="model", code="model_not_available")


def find(session: Session, *, settings: Settings, name: str) -> RegisteredModel | None:
    if NAME.fullmatch(name) is None:  # never registered (and a NUL byte is no text Postgres can compare)
        return None
    import_catalogue(session, settings=settings)
    return session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))


def get(session: Session, *, settings: Settings, name: str) -> RegisteredModel:
    row = find(session, settings=settings, name=name)
    if row is None:
        raise NotFound(f"No registered model {name!r}.", param="name")
    return row


def ready_for_jobs(session: Session, *, settings: Settings, name: str) -> RegisteredModel:
    """The model a job names, ready to train; registered on the spot when it is a hub id and the operator
    allowed unregistered models."""
    row = find(session, settings=settings, name=name)
    if row is None and settings.allow_unregistered_models and HUB_ID.fullmatch(name):
        try:
            row = register(session, settings=settings, name=name, source=f"hf:{name}", source_param="model")
        except Conflict:  # another job's request registered it meanwhile
            session.commit()  # ends what the refused insert left open (on SQLite, its write lock)
            row = find(session, settings=settings, name=name)
    if row is None:
        names = [m.name for m in list_models(session, settings=settings, statuses=USABLE_STATUSES)]
        raise InvalidRequest(f"Model {name!r} is not available for fine-tuning. Available: {names}.",
                             param="model", code="model_not_available")
    if row.status == "error":
        raise InvalidRequest(f"Model {name!r} cannot be used: {row.error}", param="model",
                             code="model_not_available")
    return row


def remove(session: Session, *, settings: Settings, name: str) -> RegisteredModel:
    """Unregister a model, unless a job that has not finished uses it. The row goes first, then the jobs are looked
    for (the caller commits only if none is found), as a job's insert writes the row first too (hold)."""
    row = get(session, settings=settings, name=name)
    session.delete(row)
    session.flush()
    in_use = session.scalar(select(FineTuningJob.id).where(FineTuningJob.base_model == name,
                                                           FineTuningJob.status.in_(UNFINISHED_STATUSES)).limit(1))
    if in_use is not None:
        session.rollback()
        raise Conflict(f"Model {name!r} is used by fine-tuning job {in_use}, which has not finished.",
                       param="name", code="model_in_use")
    return row


def hold(session: Session, *, name: str, revision: str | None) -> None:
    """Hold the base model's row just before inserting a job on it, in that insert's transaction
    (app/core/db.py), still registered for the weights `revision` (revision_of) the job was planned on and
    usable: unregistering it (remove) waits for the insert and then sees the job, or it (or a registration again,
    or a failed download) came first and this refuses the job, 400 model_not_available."""
    conditions = [RegisteredModel.name == name, RegisteredModel.status.in_(USABLE_STATUSES)]
    if revision is not None:
        source, _, commit = revision.rpartition("@")
        conditions += [RegisteredModel.source == source, func.coalesce(RegisteredModel.commit_sha, "") == commit]
    if not hold_rows(session, RegisteredModel.owned_by, *conditions):
        raise InvalidRequest(f"Model {name!r} was unregistered, registered again or failed while this request was "
                             "handled; send it again.", param="model", code="model_not_available")


def _pinned(session: Session, *, name: str, commit_sha: str | None) -> RegisteredModel | None:
    """The row a download is for, locked; None once it was removed or registered again at another commit."""
    return session.scalar(select(RegisteredModel).where(RegisteredModel.name == name,
                                                        RegisteredModel.commit_sha == commit_sha).with_for_update())


def record_download(session: Session, *, name: str, commit_sha: str | None, worker: str, done_bytes: int,
                    total_bytes: int) -> None:
    """A worker host is fetching the model (its heartbeat): status downloading, unless a host already holds it."""
    row = _pinned(session, name=name, commit_sha=commit_sha)
    if row is not None:
        if row.status != "ready":
            row.status, row.error = "downloading", None
        row.download = {"worker": worker, "done_bytes": done_bytes, "total_bytes": total_bytes,
                        "updated_at": time.time()}
    session.commit()


def record_ready(session: Session, *, name: str, commit_sha: str | None, worker: str) -> None:
    """A worker host holds a verified copy."""
    row = _pinned(session, name=name, commit_sha=commit_sha)
    if row is not None:
        row.status, row.error, row.download = "ready", None, None
        if worker not in row.hosts:
            row.hosts = [*row.hosts, worker]
    session.commit()


def record_failure(session: Session, *, name: str, commit_sha: str | None, message: str) -> list[str]:
    """The model cannot be had (the Hub refused it, the disk filled up, its files fail their hashes): it goes to
    error with the message, and the jobs queued on it fail with it; the ids of those jobs."""
    from app.services.attempts import fail_waiting_job

    row = _pinned(session, name=name, commit_sha=commit_sha)
    if row is None:
        session.commit()
        return []
    row.status, row.error, row.download = "error", message, None
    waiting = list(session.scalars(select(FineTuningJob).where(FineTuningJob.base_model == name,
                                                               FineTuningJob.status == JobStatus.QUEUED)))
    for job in waiting:
        fail_waiting_job(session, job=job, code="model_not_available",
                         message=f"Model {name!r} cannot be used: {message}")
    session.commit()
    return [job.id for job in waiting]


def downloading_elsewhere(row: RegisteredModel, *, worker: str, now: float | None = None) -> bool:
    """Another live worker host is fetching the model now (its heartbeat is fresh)."""
    download = row.download or {}
    return (row.status == "downloading" and download.get("worker") != worker
            and (now or time.time()) - float(download.get("updated_at") or 0) < DOWNLOAD_STALE_SECONDS)


def request_pull(session: Session, *, settings: Settings, name: str, worker: str | None = None) -> list[str]:
    """Ask every live worker (or the one named) to fetch a hub model into its cache; the workers asked."""
    from app.core.broker import PULL_MODEL_TASK, celery_client
    from app.services.workers import live_workers

    row = get(session, settings=settings, name=name)
    if row.hub_repo is None:
        raise InvalidRequest(f"{name!r} is a local folder ({row.source}): there is nothing to download.",
                             param="name", code="invalid_value")
    targets = [w for w in live_workers(session, settings=settings) if worker is None or w.name == worker]
    if worker is not None and not targets:
        raise InvalidRequest(f"No live worker named {worker!r}.", param="worker", code="invalid_value")
    if row.status == "error":  # the operator asks again (a disk freed, a token granted): try afresh
        row.status, row.error = "registered", None
        session.commit()
    for target in targets:
        celery_client().send_task(PULL_MODEL_TASK, args=[name], queue=target.queue, retry=True)
    return [w.name for w in targets]
