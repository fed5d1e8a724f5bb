"""This worker's registration in the workers table (app/services/workers.py): what it offers (settings, or
nvidia-smi), its heartbeat, its shutdown.

Runs in the Celery parent process, which never imports torch or touches CUDA (a CUDA context there
would hold GPU memory for the worker's lifetime and break the training child's fork-free start):
GPUs are counted with nvidia-smi, honouring CUDA_VISIBLE_DEVICES like CUDA would.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from importlib import metadata

from app.core.config import Settings
from app.core.db import session_scope
from app.services import workers as worker_service
from app.services.workers import WorkerSpec

logger = logging.getLogger("tuneforge.registry")
NVIDIA_SMI_TIMEOUT_SECONDS = 10

_spec: WorkerSpec | None = None
_stop_heartbeat = threading.Event()
_heartbeat_thread: threading.Thread | None = None


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"


def _visible(index: str, uuid: str, visible: list[str]) -> bool:
    return any(v == index or (v.startswith("GPU-") and uuid.startswith(v)) for v in visible)


def detect_gpus() -> list[tuple[str, float]]:
    """(name, memory GiB) of each GPU this process may use; [] without nvidia-smi or a driver."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name,memory.total",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                timeout=NVIDIA_SMI_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.info("no GPUs detected (nvidia-smi: %s)", exc)
        return []
    if result.returncode != 0:
        logger.warning("nvidia-smi failed (%s): %s; counting 0 GPUs (set TUNEFORGE_WORKER_GPUS to override)",
                       result.returncode, result.stderr.strip()[:300])
        return []
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = None if visible_env is None else [v.strip() for v in visible_env.split(",") if v.strip()]
    gpus = []
    for line in result.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        index, uuid, name, memory = fields
        if visible is not None and not _visible(index, uuid, visible):
            continue
        try:
            gpus.append((name, round(float(memory) / 1024, 1)))  # MiB -> GiB
        except ValueError:  # "[N/A]" (some MIG and vGPU setups)
            logger.warning("nvidia-smi reports no memory for GPU %s (%s); set TUNEFORGE_WORKER_GPU_MEMORY_GB",
                           index, name)
            gpus.append((name, 0.0))
    return gpus


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):  # not Linux
        return None


def _version() -> str:
    try:
        return metadata.version("tuneforge")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_spec(settings: Settings) -> WorkerSpec:
    """What this worker offers: the settings where given, detected otherwise."""
    detected = detect_gpus() if settings.worker_gpus is None or settings.worker_gpu_memory_gb is None else []
    gpus = settings.worker_gpus if settings.worker_gpus is not None else len(detected)
    memory = settings.worker_gpu_memory_gb
    if memory is None and gpus and detected:
        memory = min(m for _, m in detected) or None
    name = worker_name(settings)
    return WorkerSpec(name=name, hostname=socket.gethostname(), pid=os.getpid(),
                      queue=worker_service.direct_queue(settings, name), version=_version(), gpus=gpus,
                      gpu_memory_gb=memory if gpus else None, labels=tuple(settings.worker_labels),
                      gpu_names=tuple(n for n, _ in detected[:gpus]), cpu_count=os.cpu_count() or 1,
                      memory_gb=_memory_gb())


def this_worker(settings: Settings) -> WorkerSpec:
    """This process's spec, detected once."""
    global _spec
    if _spec is None:
        _spec = build_spec(settings)
    return _spec


def set_current_job(settings: Settings, job_id: str | None, *, draining: bool = False) -> None:
    """Tell the registry what this worker runs now; a failure costs only a stale admin view."""
    try:
        with session_scope() as session:
            worker_service.set_current_job(session, name=this_worker(settings).name, job_id=job_id, draining=draining)
    except Exception:  # database restarting: the next claim or finish writes it again
        logger.exception("could not record the current job in the worker registry")


def register(settings: Settings) -> None:
    spec = this_worker(settings)
    with session_scope() as session:
        worker_service.register_worker(session, spec=spec)
    logger.info("worker %s registered: %s GPU(s)%s, labels %s, queue %s", spec.name, spec.gpus,
                f" ({spec.gpu_memory_gb:g} GiB each)" if spec.gpu_memory_gb else "", list(spec.labels), spec.queue)


def beat(settings: Settings, *, draining: bool) -> None:
    """One heartbeat; registers again when the row is gone (pruned, or the database was restored)."""
    with session_scope() as session:
        found = worker_service.record_heartbeat(session, name=this_worker(settings).name, draining=draining)
    if not found:
        register(settings)


def start(settings: Settings, *, draining: threading.Event) -> threading.Thread:
    """Register now and heartbeat every heartbeat_seconds until stop(); draining marks the row draining."""
    global _heartbeat_thread
    _stop_heartbeat.clear()

    def loop() -> None:
        registered = False
        while True:
            try:
                # A restart under the same name replaces the old row (its labels or GPUs may differ).
                if not registered:
                    register(settings)
                    registered = True
                else:
                    beat(settings, draining=draining.is_set())
            except Exception:  # database down: the row goes stale, routing skips us until we are back
                logger.exception("worker heartbeat failed")
            if _stop_heartbeat.wait(settings.heartbeat_seconds):
                return

    _heartbeat_thread = threading.Thread(target=loop, name="tuneforge-registry", daemon=True)
    _heartbeat_thread.start()
    return _heartbeat_thread


def stop(settings: Settings) -> None:
    """Clean shutdown: stop the heartbeat, then leave the registry."""
    _stop_heartbeat.set()
    if _heartbeat_thread is not None:
        _heartbeat_thread.join(timeout=30)
    try:
        with session_scope() as session:
            worker_service.remove_worker(session, name=this_worker(settings).name)
    except Exception:  # the row goes stale and is shown as not live, then forgotten
        logger.exception("could not remove this worker from the registry")
