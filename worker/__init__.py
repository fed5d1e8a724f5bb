"""The worker: Celery tasks, the attempt processes they start, and the training code (worker/training/)."""

from worker.training.host import cap_cpu_library_caches

cap_cpu_library_caches()
