"""The README's quick start works from a fresh clone: the `train.jsonl` its CLI, SDK and curl steps upload is made
by a step before them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.services.datasets import validate_chunks

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_makes_the_dataset_it_uploads_before_uploading_it(tmp_path: Path) -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    made_at, command = next((i, line.split()) for i, line in enumerate(lines)
                            if "scripts/" in line and "train.jsonl" in line and "upload" not in line)
    uploads = [i for i, line in enumerate(lines) if "train.jsonl" in line and ("upload" in line or "open(" in line
                                                                               or "file=@" in line)]
    assert uploads and min(uploads) > made_at
    assert command[0] == ".venv/bin/python"
    subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]], cwd=tmp_path, check=True)
    report = validate_chunks([(tmp_path / "train.jsonl").read_bytes()]).report()
    assert report["error_count"] == 0 and report["examples"] >= 10, report
