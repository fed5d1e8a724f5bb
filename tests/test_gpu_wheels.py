"""scripts/gpu_wheels.py, without downloading: what it carries to a lent GPU machine covers what the worker, the GPU
tests and the benchmark need there, and bitsandbytes' wheel keeps the libraries the image's CUDA 13 torch loads."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_wheels.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_package_the_carried_ones_need_is_carried_or_in_the_image() -> None:
    gpu_wheels = load_script()
    assert gpu_wheels.missing_on_the_device("3.12") == []
    # the check walks requirements: without the carried pydantic-core, pydantic's need of it shows
    gpu_wheels.CARRY = [n for n in gpu_wheels.CARRY if n != "pydantic-core"]
    assert gpu_wheels.missing_on_the_device("3.12") == ["pydantic-core"]


def test_requirements_that_the_images_known_versions_fall_short_of_are_named() -> None:
    gpu_wheels = load_script()
    assert gpu_wheels.unmet_on_the_device("3.12") == []
    gpu_wheels.IMAGE_VERSIONS = {**gpu_wheels.IMAGE_VERSIONS, "tokenizers": "0.22.1"}
    unmet = gpu_wheels.unmet_on_the_device("3.12")
    assert any(line.startswith("transformers needs tokenizers") and "(the image has 0.22.1)" in line for line in unmet)


def test_the_check_starts_from_the_worker_extra_and_finds_a_worker_requirement_that_is_not_there() -> None:
    gpu_wheels = load_script()
    needed = gpu_wheels.needed_on_the_device("3.12")
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate", "torchmetrics"} <= needed
    assert "wandb" not in needed and "fastapi" not in needed
    gpu_wheels.IMAGE = gpu_wheels.IMAGE - {"torchmetrics"}
    assert "torchmetrics" in gpu_wheels.missing_on_the_device("3.12")


def test_the_bitsandbytes_wheel_keeps_its_cpu_and_cuda_13_libraries(tmp_path: Path) -> None:
    gpu_wheels = load_script()
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["cpu", "cuda128", "cuda130", "cuda132", "rocm72", "xpu2026"]
    names = ["bitsandbytes/__init__.py", *(f"bitsandbytes/libbitsandbytes_{k}.so" for k in libraries),
             "bitsandbytes-0.50.2.dist-info/METADATA"]
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, name)
    gpu_wheels.trim_bitsandbytes(wheel)
    with zipfile.ZipFile(wheel) as archive:
        assert archive.namelist() == [n for n in names if not any(k in n for k in ("cuda128", "rocm", "xpu"))]
        assert archive.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"bitsandbytes/libbitsandbytes_cuda130.so"


def test_the_unpacked_packages_requirements_that_are_not_met_there_are_named(tmp_path: Path) -> None:
    gpu_wheels = load_script()
    info = tmp_path / "carried-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: carried\nVersion: 1.0\n"
                                   "Requires-Dist: packaging>=999\nRequires-Dist: not-a-package-anywhere\n"
                                   "Requires-Dist: pytest\nRequires-Dist: nothing-on-linux; sys_platform == 'win32'\n")
    assert gpu_wheels.unmet_in(tmp_path) == [
        f"carried needs packaging>=999: {importlib.metadata.version('packaging')} there",
        "carried needs not-a-package-anywhere: not there"]
