"""How a training process (`python -m worker.attempt`) tells its supervisor what happened, by exit code. Any
other code, or death by a signal, is a crash: counted against the job (app/services/attempts.py)."""

EXIT_OK = 0  # the outcome is recorded in the database (finished, failed, paused, released, cancelled)
EXIT_STALE = 3  # another attempt owns the job now: nothing to record
EXIT_DATABASE = 4  # the database went away mid-attempt: the job goes back to the queue, not the job's fault
