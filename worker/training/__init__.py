"""Training: plain, Celery-free Python (recipe.train is the entry point)."""

from worker.training.host import cap_cpu_kernel_caches

cap_cpu_kernel_caches()
