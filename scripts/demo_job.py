"""Submit a demo fine-tuning job to a running tuneforge and follow it to the end.

    python scripts/demo_job.py [--url http://127.0.0.1:8000] [--key KEY]
    python scripts/demo_job.py --write-dataset train.jsonl   # only write the demo dataset (the README's uploads)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import httpx


def demo_dataset(n: int = 60) -> bytes:
    colours = ["red", "blue", "green", "yellow"]
    rows = [{"messages": [{"role": "system", "content": "You map codes to colours."},
                          {"role": "user", "content": f"What colour is code {i}?"},
                          {"role": "assistant", "content": colours[i % len(colours)]}]} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default=os.environ.get("TUNEFORGE_API_KEY", "local"))
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--write-dataset", type=Path, metavar="PATH",
                        help="Write the demo dataset (JSONL) to PATH and exit; no server needed.")
    args = parser.parse_args()
    if args.write_dataset:
        args.write_dataset.write_bytes(demo_dataset())
        print(f"demo dataset written to {args.write_dataset}")
        return
    started = time.monotonic()
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=60) as client:
        upload = client.post("/v1/files", files={"file": ("demo.jsonl", demo_dataset())},
                             data={"purpose": "fine-tune"})
        upload.raise_for_status()
        file_id = upload.json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": args.model, "training_file": file_id, "suffix": "demo",
            "hyperparameters": {"n_epochs": 2, "batch_size": 4}}).json()
        print(f"created {job['id']} ({job['status']})")
        seen: set[str] = set()
        while True:
            job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
            for event in reversed(events):
                if event["id"] not in seen:
                    seen.add(event["id"])
                    print(f"  [{event['level']}] {event['message']}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        print(f"{job['status']} in {time.monotonic() - started:.1f}s: fine_tuned_model={job['fine_tuned_model']} "
              f"trained_tokens={job['trained_tokens']} error={job['error']}")
        if job["status"] == "succeeded":
            path = f"{job['id']}-adapter.tar"
            url = f"/v1/fine_tuning/jobs/{job['id']}/artifacts/adapter"
            with open(path, "wb") as out, client.stream("GET", url) as response:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            print(f"adapter saved to {path}")


if __name__ == "__main__":
    main()
