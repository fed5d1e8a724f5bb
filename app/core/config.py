"""Deployment settings, shared by the API, the worker and the CLI.

Every setting reads from the environment with the TUNEFORGE_ prefix (docs/settings.md lists them).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Worker labels and the labels a job asks for: short tokens safe in logs, URLs and queue names.
LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class CatalogueModel(BaseModel):
    """One base model the operator allows jobs to train."""

    # A local directory with safetensors weights and a tokenizer. Hub ids are not fetched at run
    # time: operators download weights ahead (workers often have no internet).
    path: str
    # Executes Python shipped with the model; off unless the operator vouches for the repository.
    trust_remote_code: bool = False
    owned_by: str = "tuneforge"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    # Where every piece keeps its local state (SQLite, embedded broker, local storage, work dirs).
    data_dir: Path = Path(".tuneforge")
    # Empty means the embedded SQLite database under data_dir.
    database_url: str = ""
    # Empty means the embedded filesystem broker under data_dir (one host only).
    broker_url: str = ""
    # "database" keeps file and artifact bytes in the database, so workers on other hosts read them
    # without a shared filesystem; "local" keeps them under data_dir (embedded mode, one host).
    storage_backend: Literal["auto", "local", "database"] = "auto"

    # JSON object {name: {"path": ..., "trust_remote_code": false}}; overrides catalogue_file
    # (default: data_dir/catalogue.json, which `tuneforge make-tiny-model --register` writes).
    model_catalogue: dict[str, CatalogueModel] = Field(default_factory=dict)
    catalogue_file: Path | None = None
    # Where a worker host keeps the hub models it downloaded (default: data_dir/models).
    model_cache: Path | None = None
    # A Hugging Face token for gated models: sent to the Hub (HF_ENDPOINT, for a mirror), never logged or shown.
    hf_token: SecretStr | None = None
    # Which sources may be registered: comma-separated globs over "hf:ORG/NAME" and "path:/folder" ("*": any).
    model_sources: str = "*"
    # Let a job name a hub id ("Qwen/Qwen2.5-0.5B") that is not registered: it is registered on the spot.
    allow_unregistered_models: bool = False

    # Without keys every request acts as the default project; only allowed on a loopback bind.
    require_api_keys: bool = True
    default_project: str = "default"

    max_upload_bytes: int = Field(default=1024**3, ge=1)
    # Uploads up to this size are validated while they stream in; larger ones are checked on their
    # first bytes only, kept with status "uploaded" and validated in full by the worker before a job
    # uses them (so a big upload is not held open by validation).
    intake_sync_validation_bytes: int = Field(default=64 * 1024**2, ge=0)
    min_training_examples: int = Field(default=10, ge=1)
    list_limit_max: int = Field(default=100, ge=1)

    # A running attempt renews its lease every heartbeat; a lease not renewed in time is reaped.
    lease_seconds: float = Field(default=60.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    reaper_interval_seconds: float = Field(default=15.0, gt=0)
    # A job whose attempts keep dying (OOM kill every time) fails instead of looping forever: this many
    # crashes in a row without a new checkpoint in between. Pauses, resumes, a worker's graceful hand-off
    # and a lease lost with a dead worker host never count.
    max_attempts: int = Field(default=3, ge=1)
    # A running job also checkpoints when this much time passed since its last checkpoint: bounds the
    # work a crash loses, whatever save_steps/n_checkpoints the job chose.
    checkpoint_interval_seconds: float = Field(default=600.0, gt=0)
    # Retention: a job keeps its latest N registered checkpoints (and the best by validation loss).
    checkpoints_kept_after_finish: int = Field(default=3, ge=1)
    # A worker host keeps each training attempt's log this long (the work directories go with their attempt).
    attempt_log_retention_days: float = Field(default=7.0, gt=0)
    # How long a cancelled training process gets to stop by itself before it is killed.
    cancel_grace_seconds: float = Field(default=5.0, gt=0)
    # Fork single-process attempts from a pre-imported process (worker/zygote.py) instead of starting them cold.
    worker_warm_start: bool = True
    # How long a stopping process waits for its work: `tuneforge api` for in-flight requests (open event
    # streams are closed after it), `tuneforge serve` for its worker to checkpoint and hand its job back.
    stop_grace_seconds: float = Field(default=60.0, gt=0)
    # Jobs may log to Weights & Biases (`integrations: [{"type": "wandb", ...}]`). "online" needs an API key,
    # set on the API (it refuses such jobs without one) and on every worker (the training process uses it);
    # "offline" keeps each run on its worker host for `wandb sync`.
    wandb_api_key: SecretStr | None = None
    wandb_mode: Literal["online", "offline"] = "online"
    training_queue: str = "training"
    worker_name: str = ""
    # What this worker offers to jobs that ask for resources (docs/operators.md, "Adding a worker host").
    # Labels: comma-separated or a JSON list, e.g. "a100,eu-west"; a job asking for labels runs only on
    # a worker that has all of them.
    worker_labels: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # None = ask nvidia-smi at start (honouring CUDA_VISIBLE_DEVICES); set them where detection is wrong
    # (MIG slices, containers without nvidia-smi) or to keep a GPU host for CPU jobs (0).
    worker_gpus: int | None = Field(default=None, ge=0, le=64)
    # Memory of the worker's smallest GPU, in GiB as nvidia-smi reports it.
    worker_gpu_memory_gb: float | None = Field(default=None, gt=0)
    # A worker whose registry heartbeat is older than this is not live: jobs are not routed to it and
    # the admin view shows it as gone. None = 3 heartbeats, at least 15 s.
    worker_stale_seconds: float | None = Field(default=None, gt=0)
    # Running jobs per project at once, so one team's backlog cannot hold every worker; its other jobs
    # wait queued (in priority order) for one of its slots. 0 = no limit (single-team deployments).
    max_running_jobs_per_project: int = Field(default=4, ge=0)

    # Request bodies other than multipart uploads (JSON); uploads are capped by max_upload_bytes.
    max_json_body_bytes: int = Field(default=1024**2, ge=1)
    # Jobs validating, queued or running at once per project: more answer 429 quota_exceeded.
    max_active_jobs_per_project: int = Field(default=10, ge=1)
    # Requests per minute per API key (token bucket, bursts up to rate_limit_burst); 0 turns it off.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    rate_limit_burst: int = Field(default=120, ge=1)
    # "redis" shares buckets between API processes; "memory" counts per process; "auto" picks redis
    # when the broker is Redis.
    rate_limit_backend: Literal["auto", "memory", "redis"] = "auto"
    # "json": API, worker and training processes log one JSON object per line (worker and training
    # lines carry job_id and attempt), for log shippers; "text" is for people reading a terminal.
    log_format: Literal["text", "json"] = "text"
    # Webhooks: a failed delivery is retried after webhook_retry_seconds, doubling each time (at most
    # an hour apart), until webhook_max_attempts; each step of a POST waits at most webhook_timeout_seconds,
    # and a try three times that in all (deliveries are sent from a thread of each worker's own, beside the
    # reaper's, so a slow receiver delays only other deliveries).
    webhook_max_attempts: int = Field(default=8, ge=1)
    webhook_retry_seconds: float = Field(default=30.0, ge=0)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)

    # The inference role (`tuneforge worker --inference`): a process that keeps base models loaded and attaches
    # fine-tuned adapters on demand, serving /v1/chat/completions and /v1/completions through the API.
    # It listens on inference_host:inference_port (0 = any free port) and advertises inference_url (default
    # http://<inference_host>:<port>) in the database, where the API finds it; it is an internal address: the
    # API is the only client (set inference_url to a name the API hosts can reach when it binds 0.0.0.0).
    inference_host: str = "127.0.0.1"
    inference_port: int = Field(default=0, ge=0, le=65535)
    inference_url: str | None = None
    # Base models kept loaded at once, and adapters attached per base: the least recently used goes first.
    # Each base costs its weights in memory; an adapter costs its (small) LoRA weights.
    inference_max_bases: int = Field(default=2, ge=1)
    inference_max_adapters: int = Field(default=8, ge=1)
    # Requests waiting for the generator of one inference process (it generates one at a time); more answer 429.
    inference_max_queue: int = Field(default=8, ge=0)
    # How long the API waits for an inference process: to start answering (loading a model included) and
    # between two streamed tokens. Past it, the client gets a 504 (or an error event in a stream).
    inference_timeout_seconds: float = Field(default=300.0, gt=0)
    # The most tokens one completion may generate (a request's max_tokens is capped by it).
    inference_max_new_tokens: int = Field(default=4096, ge=1)

    @field_validator("database_url", "broker_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("worker_labels", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        if isinstance(value, list):
            for label in value:
                if not isinstance(label, str) or not LABEL_PATTERN.match(label):
                    raise ValueError(f"TUNEFORGE_WORKER_LABELS: {label!r} is not a label (1 to 64 of "
                                     "A-Z a-z 0-9 _ . : -)")
            value = list(dict.fromkeys(value))
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("TUNEFORGE_HEARTBEAT_SECONDS must be at most half of TUNEFORGE_LEASE_SECONDS")
        return self

    @property
    def resolved_worker_stale_seconds(self) -> float:
        return self.worker_stale_seconds or max(3 * self.heartbeat_seconds, 15.0)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tuneforge.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def resolved_storage_backend(self) -> Literal["local", "database"]:
        if self.storage_backend != "auto":
            return self.storage_backend
        return "local" if self.resolved_database_url.startswith("sqlite") else "database"

    # Where a worker host keeps each attempt's scratch files (downloaded data, checkpoints before upload, the
    # adapter and merged weights before upload) and its log. Work directories live only as long as their
    # attempt (worker/workdirs.py removes them); logs are kept attempt_log_retention_days.
    @property
    def work_root(self) -> Path:
        return (self.data_dir / "work").resolve()

    def attempt_work_dir(self, job_id: str, attempt: int) -> Path:
        return self.work_root / job_id / f"attempt-{attempt}"

    @property
    def log_root(self) -> Path:
        return (self.data_dir / "logs").resolve()

    def attempt_log_path(self, job_id: str, attempt: int) -> Path:
        return self.log_root / f"{job_id}-attempt-{attempt}.log"

    @property
    def model_cache_root(self) -> Path:
        return (self.model_cache or self.data_dir / "models").resolve()

    @property
    def catalogue_path(self) -> Path:
        return self.catalogue_file or self.data_dir / "catalogue.json"

    def catalogue(self) -> dict[str, CatalogueModel]:
        """The model catalogue: the catalogue file's entries, overridden by model_catalogue. CatalogueError when the
        file cannot be read as one."""
        entries: dict[str, CatalogueModel] = {}
        if self.catalogue_path.exists():
            try:
                raw = json.loads(self.catalogue_path.read_text())
                if not isinstance(raw, dict):
                    raise ValueError('not a JSON object ({"name": {"path": "/folder"}, ...})')
                entries.update({name: CatalogueModel.model_validate(spec) for name, spec in raw.items()})
            except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
                raise CatalogueError(f"The model catalogue {self.catalogue_path} cannot be read: "
                                     f"{' '.join(str(exc).split())}") from exc
        entries.update(self.model_catalogue)
        return entries


class CatalogueError(ValueError):
    """The catalogue file is not one (the operator's to mend; lookups go on with what is registered)."""


@lru_cache
def get_settings() -> Settings:
    return Settings()
