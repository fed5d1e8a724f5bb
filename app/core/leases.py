"""The lease a running attempt holds on its job (app/services/attempts.py): what losing it means."""

from __future__ import annotations


class StaleAttempt(Exception):
    """This attempt no longer owns its job (its lease was lost, the job was cancelled or runs elsewhere): it must
    stop and write nothing more. Raised by the fenced writes; the training recipe lets it propagate."""
