"""`tuneforge admin workers` rows (the command itself runs against a real API in
tests/integration/test_routing.py) and the routing flags of `tuneforge jobs create`."""

from __future__ import annotations


def test_the_cli_shows_gone_workers_and_running_jobs_in_one_row_each() -> None:
    from app.cli_client import worker_row

    worker = {"name": "gpu-a-0", "status": "busy", "live": True, "gpus": 2, "gpu_memory_gb": 79.6,
              "labels": ["h100", "eu"], "seconds_since_heartbeat": 1.4, "hostname": "gpu-a", "pid": 7,
              "current_job": {"id": "ftjob-1", "step": 12, "total_steps": None, "project": "team-a"}}
    assert worker_row(worker) == ("gpu-a-0", "busy", "2 x 79.6 GiB", "h100,eu", "1s ago",
                                  "ftjob-1 12/? (team-a)", "gpu-a:7")
    gone = {**worker, "live": False, "gpus": 0, "labels": [], "current_job": None}
    assert worker_row(gone)[1:4] == ("gone", "0", "-") and worker_row(gone)[5] == "-"


def test_priority_gpus_and_labels_flags_fill_the_extensions() -> None:
    from app.cli_client import job_request

    spec = {"model": "m", "training_file": "f", "resources": {"min_gpu_memory_gb": 40}}
    body = job_request(spec, model=None, training_file=None, validation_file=None, suffix=None, seed=None,
                       n_epochs=None, batch_size=None, learning_rate=None, adapter=None, priority=5, gpus=2,
                       labels=["a100", "eu"])
    assert body["priority"] == 5
    assert body["resources"] == {"min_gpu_memory_gb": 40, "gpus": 2, "labels": ["a100", "eu"]}
    assert spec["resources"] == {"min_gpu_memory_gb": 40}  # the loaded spec is not changed
