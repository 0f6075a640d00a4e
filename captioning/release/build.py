"""A release: one registered model version made into a bento and a container image.

    release("models:/captioner@champion")  ->  bento captioning:vN (.bento archive) and the
                                               image localhost/captioning:vN, both holding the package

The package is taken from the registry once, checked against its checksums, and put into
the bento's model store; the image then captions with no registry and no network. Each
release writes `artifacts/release/vN/release.json` and a Kubernetes overlay that sets the
image (applied only to the kubectl context `release.kube_context` names). BentoML runs in its own process
(`python -m bento build`), so the library stays free of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from captioning.config import PROJECT_ROOT, artifacts_dir
from captioning.release.container_image import (
    PACKAGE_LABEL,
    build_image,
    image_exists,
    image_label,
    image_ref,
    image_size,
)

KUBE_OVERLAY = PROJECT_ROOT / "deploy" / "overlays" / "production"


class ReleaseError(RuntimeError):
    """A release could not be made; nothing half-built is left behind as the release."""


@dataclass
class Release:
    version: str
    image: str
    bento: str
    model: str
    size_bytes: int
    build_seconds: float
    built: bool
    kubernetes: dict = field(default_factory=dict)
    dispatch: str = ""
    package_sha256: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def release_dir(version: str) -> Path:
    return artifacts_dir() / "release" / f"v{version}"


def resolve_version(model: str, tracking: str | None = None) -> tuple[str, Path]:
    """(registry version, package folder) of `models:/NAME@ALIAS` or `models:/NAME/N`."""
    from captioning.registry.locate import locate
    from captioning.registry.store import RegistryError

    if not model.startswith("models:/"):
        raise ReleaseError(
            f"a release is made of a registered model (models:/NAME@ALIAS or models:/NAME/N), not {model!r}"
        )
    try:
        located = locate(model, tracking)
    except RegistryError as error:
        raise ReleaseError(str(error)) from None
    return str(located.version), located.path


def build_bento(package: Path, version: str) -> Path:
    """The release's .bento archive (BentoML in its own process; see bento.py)."""
    out = release_dir(version) / f"captioning-v{version}.bento"
    env = {**os.environ, "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(PROJECT_ROOT / "bentoml_home"))}
    result = subprocess.run(
        [sys.executable, "-m", "bento", "build", "--package", str(package), "--version", version, "--out", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    if result.returncode != 0:
        raise ReleaseError(
            f"the bento of version {version} could not be built:\n"
            + "\n".join(result.stderr.strip().splitlines()[-10:])
        )
    return Path(result.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def release_lock():
    """One release at a time on this machine: BentoML's model store, the image tags and the
    release folders are shared by every release."""
    path = artifacts_dir() / "release" / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def release(
    model: str = "models:/captioner@champion",
    tracking: str | None = None,
    rebuild: bool = False,
    kube: bool = True,
    kube_context: str = "",
) -> Release:
    """Bento and image of a registered version. An image is reused only when its label names the
    same package (after a registry reset, version N may be another model)."""
    from captioning.inference.model_package import package_digest

    version, package = resolve_version(model, tracking)
    digest = package_digest(package)
    with release_lock():
        ref = image_ref(version)
        folder = release_dir(version)
        bento = folder / f"captioning-v{version}.bento"
        model_tag = f"bento:captioner:v{version}"
        reusable = image_exists(ref) and image_label(ref, PACKAGE_LABEL) == digest and bento.is_file()
        if reusable and not rebuild:
            result = Release(version, ref, str(bento), model_tag, image_size(ref), 0.0, False)
        else:
            started = time.perf_counter()
            bento = build_bento(package, version)
            image = build_image(bento, version, model_tag, digest)
            seconds = round(time.perf_counter() - started, 1)
            result = Release(version, ref, str(bento), model_tag, image["size_bytes"], seconds, True)
        result.package_sha256 = digest
        if kube:
            result.kubernetes = kubernetes_release(version, ref, kube_context)
        result.dispatch = dispatch_cd(version)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "release.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


def kubernetes_release(version: str, image: str, context: str = "") -> dict:
    """An overlay of the production overlay that sets this image, rendered when kubectl exists and
    applied only to the named kubectl `context` (never to whatever context is current: that may be
    a production cluster that cannot pull a localhost/ image, or a stale one).

    Returns what was done: the overlay folder, the rendered manifest, whether it was applied, and
    the error of a failed apply (which does not fail the release: the local stack never waits on a
    cluster).
    """
    overlay = release_dir(version) / "kubernetes"
    shutil.rmtree(overlay, ignore_errors=True)
    overlay.mkdir(parents=True)
    name, tag = image.rsplit(":", 1)
    base = os.path.relpath(KUBE_OVERLAY, overlay)
    (overlay / "kustomization.yaml").write_text(
        "# Written by `captioning release`: the production overlay with this release's image.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\nimages:\n  - name: {name_in_overlay()}\n    newName: {name}\n    newTag: {tag}\n",
        encoding="utf-8",
    )
    done = {"overlay": str(overlay), "rendered": "", "applied": False, "context": context, "error": ""}
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return done
    # Rendering needs no cluster: without a kubeconfig, a kubectl that asks the current context's
    # server for its version first (a version dispatcher) asks none.
    offline = {**os.environ, "KUBECONFIG": os.devnull}
    command = [kubectl, "kustomize", str(overlay)]
    rendered = subprocess.run(command, capture_output=True, text=True, timeout=120, env=offline)
    if rendered.returncode != 0:
        raise ReleaseError(f"the Kubernetes overlay of version {version} does not render: {rendered.stderr.strip()}")
    (overlay / "rendered.yaml").write_text(rendered.stdout, encoding="utf-8")
    done["rendered"] = str(overlay / "rendered.yaml")
    if context:
        command = [kubectl, "--context", context, "apply", "-k", str(overlay)]
        applied = subprocess.run(command, capture_output=True, text=True, timeout=600)
        done["applied"] = applied.returncode == 0
        done["error"] = "" if done["applied"] else applied.stderr.strip()[-2000:]
    return done


def name_in_overlay() -> str:
    """The image name the production overlay's manifests carry (its `images[]` rewrite's result)."""
    import yaml

    spec = yaml.safe_load((KUBE_OVERLAY / "kustomization.yaml").read_text(encoding="utf-8"))
    return spec["images"][0].get("newName", spec["images"][0]["name"])


def dispatch_cd(version: str) -> str:
    """Start the GitHub CD workflow (repository_dispatch `new-champion`) when configured.

    $CAPTIONING_CD_REPO (owner/name) and $GITHUB_TOKEN configure it; without them nothing is sent.
    """
    repo, token = os.environ.get("CAPTIONING_CD_REPO", ""), os.environ.get("GITHUB_TOKEN", "")
    if not repo or not token:
        return ""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ReleaseError(f"CAPTIONING_CD_REPO must be OWNER/NAME, not {repo!r}")
    body = json.dumps({"event_type": "new-champion", "client_payload": {"model_version": str(version)}}).encode()
    request = urllib.request.Request(
        f"https://api.github.com/repos/{repo}/dispatches",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            return f"dispatched new-champion {version} to {repo}"
    except OSError as error:
        return f"dispatch to {repo} failed: {error}"
