"""The compose file and the GPU Dockerfile refer to commands and settings that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.main import get_command

from app.cli import app
from app.core.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _cli_commands() -> set[str]:
    return set(get_command(app).commands)  # type: ignore[attr-defined]


def test_compose_services_run_real_tuneforge_commands_with_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = _cli_commands()
    tuneforge_services = [s for s in compose["services"].values() if s.get("command", [""])[0] == "tuneforge"]
    assert {s["command"][1] for s in tuneforge_services} == {"migrate", "api", "worker"}
    assert {s["command"][1] for s in tuneforge_services} <= commands
    known = {f"TUNEFORGE_{name.upper()}" for name in Settings.model_fields}
    for service in tuneforge_services:
        assert set(service["environment"]) <= known, set(service["environment"]) - known
    assert compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_gpu_dockerfile_copies_existing_paths_and_runs_a_real_command() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    cmd = re.search(r'^CMD \["tuneforge", "(\w+)"\]', text, flags=re.M)
    assert cmd is not None and cmd.group(1) in _cli_commands()


# The Python each Ubuntu release's archive carries (python3 is that version; no other minor version is there).
UBUNTU_PYTHON = {"22.04": "3.10", "24.04": "3.12"}


def test_gpu_dockerfile_installs_the_python_its_ubuntu_carries_and_the_project_supports_it() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text()
    release = re.search(r"^FROM nvidia/cuda:\S+-ubuntu(\d+\.\d+)$", text, flags=re.M)
    assert release is not None and release.group(1) in UBUNTU_PYTHON
    python = UBUNTU_PYTHON[release.group(1)]
    packages = re.search(r"apt-get install -y --no-install-recommends ([^&\\]+)", text)
    assert packages is not None
    versioned = [p for p in packages.group(1).split() if re.fullmatch(r"python3\.\d+.*", p)]
    assert versioned in ([], [f"python{python}"]), f"Ubuntu {release.group(1)} has Python {python}, not {versioned}"
    assert not re.search(r"python3\.(?!" + python.split(".")[1] + r")\d+ -m venv", text)
    minimum = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert minimum is not None and (int(minimum.group(1)), int(minimum.group(2))) <= tuple(map(int, python.split(".")))


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"TUNEFORGE_{name.upper()}" not in doc]
    assert not missing, missing
