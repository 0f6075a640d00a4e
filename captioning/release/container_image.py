"""Container images with podman: a Debian base image, a wheelhouse, one image per release.

No Docker engine and no image registry are needed: the base image is made from Debian
packages with debootstrap, the Python packages come from wheels gathered on the host (the
CPU build of torch from the machine's disk), and images live in the local podman store as
`localhost/captioning:vN`. podman runs with deploy/container/containers.conf (runc, lowered
ulimits), which $CONTAINERS_CONF may replace.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from captioning.config import PROJECT_ROOT

CONTAINER_DIR = PROJECT_ROOT / "deploy" / "container"
BASE_IMAGE = "localhost/captioning-base:bookworm"
IMAGE_REPO = "localhost/captioning"
DEBIAN_SUITE = "bookworm"
# Wheels of these never go into the image: the CPU torch needs none of them.
NOT_IN_IMAGE = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)==", re.IGNORECASE)


class ContainerError(RuntimeError):
    """A podman, buildah or debootstrap step failed; the message ends with its output."""


def cache_dir() -> Path:
    """Wheels and the base image's root file system in the making (kept across releases)."""
    return Path(os.environ.get("CAPTIONING_CONTAINER_CACHE", PROJECT_ROOT / "artifacts" / "container")).resolve()


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINER_DIR / "containers.conf"))}


def run(command: list[str], timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a container tool; ContainerError with the end of its output when it fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=podman_env(), **kwargs)
    except FileNotFoundError:
        raise ContainerError(f"{command[0]} is not installed: `make setup` installs it") from None
    except subprocess.TimeoutExpired:
        raise ContainerError(f"{' '.join(command[:3])} did not finish within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ContainerError(f"{' '.join(command[:3])} failed (exit {result.returncode}):\n{tail}")
    return result


def podman(*args: str, timeout: float = 900, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return run(["podman", *args], timeout=timeout, check=check, **kwargs)


def image_ref(version: str) -> str:
    """localhost/captioning:vN ($CAPTIONING_IMAGE_REPO replaces the repository: tests use their own)."""
    repo = os.environ.get("CAPTIONING_IMAGE_REPO", IMAGE_REPO)
    return f"{repo}:v{str(version).removeprefix('v')}"


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


# The label an image carries with the sha256 of the model package inside (package_digest): a
# version number alone does not name a package once a registry is reset or replaced.
PACKAGE_LABEL = "io.captioning.package-sha256"


def image_label(ref: str, label: str = PACKAGE_LABEL) -> str:
    """A label of a local image ("" when it has none)."""
    result = podman("image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', ref, check=False)
    value = result.stdout.strip() if result.returncode == 0 else ""
    return "" if value == "<no value>" else value


def image_size(ref: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (the base image comes from the same place)."""
    for path in sorted(Path("/etc/apt").glob("sources.list*/*")) + [Path("/etc/apt/sources.list")]:
        if path.is_file():
            match = re.search(r"(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)\b", path.read_text(errors="replace"))
            if match:
                return match.group(1)
    return "http://deb.debian.org/debian"


def base_image() -> str:
    """localhost/captioning-base:bookworm ($CAPTIONING_BASE_IMAGE replaces it: a cold build measures one anew)."""
    return os.environ.get("CAPTIONING_BASE_IMAGE", BASE_IMAGE)


def build_base_image(force: bool = False) -> str:
    """Debian minbase with Python 3.11 as the base image (made once, about a minute)."""
    base = base_image()
    if not force and image_exists(base):
        return base
    if shutil.which("debootstrap") is None:
        raise ContainerError("debootstrap is not installed: `make setup` installs it")
    root = cache_dir() / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", DEBIAN_SUITE, str(root), apt_mirror()],
        timeout=1200,
    )
    for folder in (
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
    ):
        shutil.rmtree(root / folder, ignore_errors=True)
    archive = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    run(
        [
            "podman",
            "import",
            "--change",
            "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "--change",
            'CMD ["/bin/bash"]',
            "-",
            base,
        ],
        stdin=archive.stdout,
        timeout=600,
    )
    archive.wait()
    shutil.rmtree(root, ignore_errors=True)
    return base


def image_requirements() -> tuple[str, str]:
    """(requirements, constraints) of the image: its requirements file, and constraints.txt less
    the CUDA build of torch and what only it needs."""
    requirements = (CONTAINER_DIR / "requirements.txt").read_text(encoding="utf-8")
    constraints = "".join(
        line + "\n"
        for line in (PROJECT_ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
        if not NOT_IN_IMAGE.match(line.strip())
    )
    return requirements, constraints


def wheelhouse() -> Path:
    """Wheels for every package of the image, gathered once per requirements (pip download)."""
    requirements, constraints = image_requirements()
    key = hashlib.sha256((requirements + constraints).encode()).hexdigest()[:12]
    folder = cache_dir() / f"wheels-{key}"
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "requirements.txt").write_text(requirements, encoding="utf-8")
    (folder / "constraints.txt").write_text(constraints, encoding="utf-8")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--dest",
            str(folder),
            "-r",
            str(folder / "requirements.txt"),
            "-c",
            str(folder / "constraints.txt"),
        ],
        timeout=1800,
    )
    (folder / ".complete").write_text("")
    return folder


def build_context(bento_archive: Path, wheels: Path, folder: Path) -> Path:
    """The build context: Containerfile, requirements, wheels (hard links) and the unpacked bento."""
    shutil.copy2(CONTAINER_DIR / "Containerfile", folder / "Containerfile")
    shutil.copy2(wheels / "requirements.txt", folder / "requirements.txt")
    shutil.copytree(wheels, folder / "wheels", copy_function=os.link)
    with tarfile.open(bento_archive) as archive:
        archive.extractall(folder / "bento", filter="data")
    return folder


def context_folder(version: str) -> Path:
    """A new, empty build context folder for one build of version N: two builds, even of the same
    version, never write into one another's context."""
    parent = cache_dir() / "context"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=image_ref(version).rsplit(":", 1)[1] + "-", dir=parent))


def build_image(bento_archive: Path, version: str, model: str, package_sha256: str) -> dict:
    """Build localhost/captioning:vN from a release's .bento archive, labelled with the package's
    digest; returns its tag, size, time. Each build has a context folder of its own."""
    started = time.perf_counter()
    base = build_base_image()
    wheels = wheelhouse()
    ref = image_ref(version)
    context = context_folder(version)
    try:
        build_context(bento_archive, wheels, context)
        podman(
            "build",
            "--format",
            "docker",
            "--layers",
            "--network",
            "none",
            "--pull=never",
            "--build-arg",
            f"BASE={base}",
            "--build-arg",
            f"MODEL={model}",
            "--build-arg",
            f"VERSION={version}",
            "--build-arg",
            f"PACKAGE_SHA256={package_sha256}",
            "--tag",
            ref,
            "--file",
            str(context / "Containerfile"),
            str(context),
            timeout=3600,
        )
    finally:
        shutil.rmtree(context, ignore_errors=True)
    return {"image": ref, "size_bytes": image_size(ref), "build_seconds": round(time.perf_counter() - started, 1)}
