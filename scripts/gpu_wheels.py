"""Fetch, here, the Python packages that scripts/gpu_check.sh needs on a lent GPU machine and its image lacks.

    . .venv/bin/activate && python scripts/gpu_wheels.py     # then: run(command="bash scripts/gpu_check.sh",
                                                            #        carry=[".gpu"], timeout_s=590)
    python3 scripts/gpu_wheels.py --unpack /tmp/site         # there (gpu_check.sh does it): no pip, no index

The lent machines (../.library/device/KINDS.md) run Python 3.12 with a CUDA build of torch, triton, accelerate,
numpy, pandas, pyarrow, pytest and more, but no bitsandbytes, TRL or liger-kernel, an older transformers (5.17) and
huggingface_hub (1.33), and nothing can be fetched there. This downloads the versions installed in this checkout's
.venv (the versions the test suite passes with) as Python 3.12 manylinux wheels into .gpu/wheels (git-ignored), and
keeps only the CPU and CUDA 13 libraries of bitsandbytes (its wheel holds one library per CUDA and ROCm release,
43 MB; what `run` carries is limited to 64 MiB). It then names any package needed there (the worker extra's, the
carried ones', and what they need in turn) that is neither carried nor in the image, so a missing one shows here
and not in the device's few minutes (tests/test_gpu_wheels.py checks the same in CI).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".gpu" / "wheels"
# Carried even where the image has a version: ours is the one the suite passes with (the image's transformers 5.17
# and huggingface_hub 1.33 are older than what transformers 5.25 requires).
CARRY = ["bitsandbytes", "trl", "liger-kernel", "transformers", "huggingface-hub", "kernels", "tomlkit", "httpx2",
         "httpcore2", "truststore", "peft", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "pydantic-settings", "python-dotenv", "pytest-timeout",
         # The image has these, in versions KINDS.md does not give, and transformers 5.25 (regex >= 2025.10.22, checked
         # at import), huggingface_hub 2.4 (click >= 8.4.2, hf-xet >= 1.6) and datasets 5.2 (fsspec <= 2026.9.0) are
         # particular about them.
         "regex", "click", "hf-xet", "fsspec"]
# Beside tuneforge's worker extra (pyproject.toml), what the GPU tests and the benchmark import there. wandb is left
# out: a job imports it only when it asks for it.
ALSO_NEEDED = ["pytest", "tokenizers"]
LEFT_OUT = {"wandb"}
# Not installed here (it needs triton, which needs CUDA): its version is set here; it needs only torch and triton.
NOT_INSTALLED_HERE = {"liger-kernel": "0.8.5"}
# The image's packages (KINDS.md, "Python packages already there"), as far as the carried ones need them.
IMAGE = {"torch", "triton", "accelerate", "annotated-doc", "numpy", "pandas", "pyarrow", "pytest", "psutil", "pyyaml",
         "jinja2", "tqdm", "regex", "requests", "filelock", "fsspec", "packaging", "xxhash", "httpx", "anyio", "idna",
         "h11", "click", "typer", "rich", "safetensors", "tokenizers", "hf-xet", "typing-extensions", "sentencepiece",
         "certifi", "markupsafe", "iniconfig", "pluggy", "pygments", "python-dateutil", "six", "urllib3",
         "charset-normalizer", "shellingham", "markdown-it-py", "mdurl", "aiohttp", "multidict", "yarl", "frozenlist",
         "aiosignal", "propcache", "attrs", "aiohappyeyeballs", "sympy", "networkx", "mpmath", "setuptools",
         "torchmetrics", "lightning-utilities"}
# The image's versions that KINDS.md gives (its pip list, 2026-11), for the packages needed there.
IMAGE_VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "accelerate": "1.15.0", "numpy": "2.5.2",
                  "safetensors": "0.8.0", "tokenizers": "0.23.2", "torchmetrics": "1.9.0"}
# bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so: the image's torch is a CUDA 13 build.
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def applicable(lines: list[str] | None, python_version: str, *, extra: str = "") -> list[Any]:
    """The requirements among `lines` (a distribution's Requires-Dist) that apply on Linux x86-64 under
    `python_version`, with `extra` (else without extras)."""
    from packaging.requirements import Requirement

    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": extra,
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    return [r for r in map(Requirement, lines or []) if r.marker is None or r.marker.evaluate(environment)]


def requirements(name: str, python_version: str, *, extra: str = "") -> set[str]:
    """The names that the installed distribution `name` requires (see applicable)."""
    return {canonical(r.name) for r in applicable(importlib.metadata.requires(name), python_version, extra=extra)}


def needed_on_the_device(python_version: str) -> set[str]:
    """The worker's requirements (tuneforge's worker extra) and what the GPU tests and the benchmark import."""
    worker = requirements("tuneforge", python_version, extra="worker") - requirements("tuneforge", python_version)
    return (worker - LEFT_OUT) | {canonical(n) for n in [*CARRY, *ALSO_NEEDED]}


def missing_on_the_device(python_version: str) -> list[str]:
    """Packages needed there (needed_on_the_device, and what they need in turn) that are neither carried nor in the
    image."""
    carried = {canonical(n) for n in CARRY}
    image = {canonical(n) for n in IMAGE}
    seen: set[str] = set()
    todo = sorted(needed_on_the_device(python_version))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in NOT_INSTALLED_HERE:
            todo.extend(requirements(name, python_version) - seen)
    return sorted(n for n in seen - carried - image if not n.startswith("nvidia-"))


def unmet_on_the_device(python_version: str) -> list[str]:
    """Requirements of the carried packages that the image's known versions (IMAGE_VERSIONS) do not meet."""
    carried = {canonical(n) for n in CARRY}
    unmet = []
    for name in sorted(carried - set(NOT_INSTALLED_HERE)):
        for requirement in applicable(importlib.metadata.requires(name), python_version):
            there = IMAGE_VERSIONS.get(canonical(requirement.name))
            if (there and canonical(requirement.name) not in carried
                    and not requirement.specifier.contains(there, prereleases=True)):
                unmet.append(f"{name} needs {requirement.name}{requirement.specifier} (the image has {there})")
    return unmet


def unpack(site: Path) -> list[str]:
    """There: unpack the carried wheels into `site` (a wheel is a zip file; nothing carried needs its entry points),
    and return the requirements of the unpacked packages that what `site` and this Python hold does not meet."""
    wheels = sorted((ROOT / ".gpu" / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit("no wheels in .gpu/wheels: run `python scripts/gpu_wheels.py` here and carry .gpu")
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(site)
    print(f"unpacked {len(wheels)} wheels into {site}")
    return unmet_in(site)


def unmet_in(site: Path) -> list[str]:
    """Requirements of the distributions in `site` that `site` and then this Python's path do not meet (the order
    of PYTHONPATH=site)."""
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    path = [str(site), *sys.path]
    unmet = []
    for info in sorted(site.glob("*.dist-info")):
        dist = importlib.metadata.Distribution.at(info)
        for requirement in applicable(dist.requires, python_version):
            found = next(iter(importlib.metadata.distributions(name=requirement.name, path=path)), None)
            if found is None:
                unmet.append(f"{dist.metadata['Name']} needs {requirement}: not there")
            elif not requirement.specifier.contains(found.version, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {requirement}: {found.version} there")
    return unmet


def trim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the bitsandbytes wheel without the libraries for other CUDA, ROCm and XPU releases."""
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            library = item.filename.rsplit("/", 1)[-1]
            if library.startswith("libbitsandbytes_") and not BNB_KEEP.search(library):
                continue
            target.writestr(item, source.read(item))
    trimmed.replace(wheel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python_version", nargs="?", default="3.12",
                        help="the wheels' Python (the image's 3.12; another for a rehearsal on this machine)")
    parser.add_argument("--unpack", type=Path, metavar="SITE",
                        help="on the GPU machine: unpack .gpu/wheels into SITE and name the requirements unmet there")
    args = parser.parse_args()
    if args.unpack:
        for line in unpack(args.unpack):
            print(f"UNMET: {line}")  # the run goes on: the tests say what it breaks
        return 0
    python_version = args.python_version
    DEST.mkdir(parents=True, exist_ok=True)
    for old in DEST.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={NOT_INSTALLED_HERE.get(name) or importlib.metadata.version(name)}" for name in CARRY]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(DEST),
                    *pins], check=True)
    for wheel in DEST.glob("bitsandbytes-*.whl"):
        trim_bitsandbytes(wheel)
    total = sum(w.stat().st_size for w in DEST.glob("*.whl"))
    print(f"{len(pins)} wheels for Python {python_version} in {DEST.relative_to(ROOT)}: {total / 2**20:.1f} MiB")
    missing = missing_on_the_device(python_version)
    if missing:
        print(f"needed but neither carried nor in the image: {', '.join(missing)} (add them to CARRY)")
    unmet = unmet_on_the_device(python_version)
    if unmet:
        print(f"the image's versions fall short: {'; '.join(unmet)} (add them to CARRY)")
    return 1 if missing or unmet else 0


if __name__ == "__main__":
    raise SystemExit(main())
