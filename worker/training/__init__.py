"""Training: plain, Celery-free Python (recipe.train is the entry point)."""
