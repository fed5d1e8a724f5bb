"""What a worker offers: settings where given, nvidia-smi otherwise (never torch in the Celery parent)."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from app.core.config import Settings
from worker import registration

SMI_OUTPUT = """0, GPU-aaaa1111-0000, NVIDIA H100 80GB HBM3, 81559
1, GPU-bbbb2222-0000, NVIDIA A100-SXM4-40GB, 40960
2, GPU-cccc3333-0000, NVIDIA A100-SXM4-40GB, [N/A]
"""


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `nvidia-smi` on PATH that prints a fixed three-GPU answer and records its arguments."""
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'args')!r}, 'w').write(' '.join("
                      f"sys.argv[1:]))\nsys.stdout.write({SMI_OUTPUT!r})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def test_gpus_are_counted_with_nvidia_smi_in_gib(fake_smi: Path) -> None:
    assert registration.detect_gpus() == [("NVIDIA H100 80GB HBM3", 79.6), ("NVIDIA A100-SXM4-40GB", 40.0),
                                      ("NVIDIA A100-SXM4-40GB", 0.0)]
    assert "--query-gpu=index,uuid,name,memory.total" in (fake_smi / "args").read_text()


def test_only_the_gpus_cuda_visible_devices_leaves_count(fake_smi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert registration.detect_gpus() == [("NVIDIA A100-SXM4-40GB", 40.0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa1111,1")
    assert [m for _, m in registration.detect_gpus()] == [79.6, 40.0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert registration.detect_gpus() == []


def test_the_spec_takes_the_smallest_gpu_and_settings_override_detection(fake_smi: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    spec = registration.build_spec(Settings(worker_name="gpu-a", worker_labels=["a100"], training_queue="training"))
    assert (spec.name, spec.queue, spec.gpus, spec.gpu_memory_gb) == ("gpu-a", "training.gpu-a", 2, 40.0)
    assert spec.gpu_names == ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB") and spec.labels == ("a100",)
    assert spec.cpu_count >= 1 and spec.version
    forced = registration.build_spec(Settings(worker_name="gpu-a", worker_gpus=1, worker_gpu_memory_gb=80))
    assert (forced.gpus, forced.gpu_memory_gb) == (1, 80)
    cpu_only = registration.build_spec(Settings(worker_name="gpu-a", worker_gpus=0))
    assert (cpu_only.gpus, cpu_only.gpu_memory_gb) == (0, None)


def test_no_nvidia_smi_means_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert registration.detect_gpus() == []
    assert registration.build_spec(Settings(worker_name="cpu")).gpus == 0


def test_worker_names_become_queue_names_every_transport_accepts() -> None:
    from app.services.workers import direct_queue

    settings = Settings(training_queue="training")
    assert direct_queue(settings, "gpu-host:1234") == "training.gpu-host_1234"
    assert direct_queue(settings, "a/b c") == "training.a_b_c"


def test_worker_labels_read_from_comma_separated_or_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_WORKER_LABELS", "a100, eu-west")
    assert Settings().worker_labels == ["a100", "eu-west"]
    monkeypatch.setenv("TUNEFORGE_WORKER_LABELS", '["a100"]')
    assert Settings().worker_labels == ["a100"]
    monkeypatch.setenv("TUNEFORGE_WORKER_LABELS", "a100 eu")
    with pytest.raises(ValueError, match="is not a label"):
        Settings()
