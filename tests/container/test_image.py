"""A release's image: self-contained (no MLflow, no network, no mounted model), small, hardened,
and answering like `make serve`."""

from __future__ import annotations

import base64
import json
import tarfile
import time
from pathlib import Path

import pytest

from captioning.inference.model_package import check_package_files
from captioning.release.container_image import image_size, podman
from tests.container.conftest import IMAGE_REPO

CLIENT = """
import base64, json, sys, urllib.request, uuid
def post(path, data, name="photo.jpg", fields=()):
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"{k}\\"\\r\\n\\r\\n{v}\\r\\n".encode()
                    for k, v in fields)
    body += (f"--{boundary}\\r\\nContent-Disposition: form-data; name=\\"image\\"; filename=\\"{name}\\"\\r\\n"
             "Content-Type: application/octet-stream\\r\\n\\r\\n").encode() + data + f"\\r\\n--{boundary}--\\r\\n".encode()
    request = urllib.request.Request("http://127.0.0.1:3000" + path, data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
photo = base64.b64decode(sys.stdin.read())
print(json.dumps({"photo": post("/caption", photo), "text": post("/caption", b"not an image", "x.txt"),
                  "beam": post("/caption", photo, fields=[("beam_size", "1000")]),
                  "model": json.loads(urllib.request.urlopen("http://127.0.0.1:3000/model", timeout=30).read())}))
"""


@pytest.fixture(scope="module")
def offline_container(first_release):
    """The image serving both services with no network at all and a read-only root file system."""
    name = "captioning-test-offline"
    podman("rm", "--force", name, check=False)
    podman("run", "--detach", "--name", name, "--network", "none", "--read-only", "--tmpfs", "/tmp", first_release)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if podman("exec", name, "python", "-m", "bento", "health", check=False).returncode == 0:
            break
        if "running" not in podman("inspect", "--format", "{{.State.Status}}", name).stdout:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the container did not become ready:\n{podman('logs', '--tail', '40', name).stderr}")
    yield name
    podman("rm", "--force", "--time", "5", name, check=False)


def test_release_is_a_bento_and_an_image_holding_the_version(first_release, workspace, packages):
    assert first_release == f"{IMAGE_REPO}:v1"
    folder = Path(workspace["CAPTIONING_ARTIFACTS_DIR"]) / "release" / "v1"
    manifest = json.loads((folder / "release.json").read_text())
    assert manifest["image"] == first_release and manifest["version"] == "1"
    with tarfile.open(manifest["bento"]) as archive:
        names = archive.getnames()
        model_yaml = archive.extractfile("./models/captioner/v1/model.yaml").read().decode()
    assert "./models/captioner/v1/weights.pt" in names and "./src/service.py" in names
    sources = {name.split("/")[2] for name in names if name.startswith("./src/") and name.count("/") > 1}
    assert sources <= {"service.py", "bento.py", "captioning", "web", "bentofile.yaml"}, sources
    for name, sha in check_package_files(packages[0]).items():  # the package, checksums recorded
        assert sha in model_yaml, name
    assert 300e6 < image_size(first_release) < 2e9
    # The production overlay with this release's image, rendered and validated offline.
    import kubernetes_validate
    import yaml

    docs = [doc for doc in yaml.safe_load_all((folder / "kubernetes" / "rendered.yaml").read_text()) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    images = {
        c["image"] for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {first_release}
    assert manifest["kubernetes"]["applied"] is False  # no kube context here


def test_image_has_no_mlflow_and_one_torch(first_release):
    probe = (
        "import importlib.util as u, json, torch; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "['mlflow', 'prefect', 'timm', 'torchvision', 'dvc']} | {'torch': torch.__version__}))"
    )
    result = podman("run", "--rm", "--network", "none", "--entrypoint", "python", first_release, "-c", probe)
    found = json.loads(result.stdout)
    assert found.pop("torch").endswith("+cpu")
    assert not any(found.values()), found
    build_tools = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        first_release,
        "-c",
        "command -v gcc cc pip pip3 || true",
    ).stdout
    assert build_tools.strip() == ""


def test_offline_container_captions_a_photo_like_make_serve(offline_container, photo):
    result = podman(
        "exec", "--interactive", offline_container, "python", "-c", CLIENT, input=base64.b64encode(photo).decode()
    )
    answers = json.loads(result.stdout)
    status, body = answers["photo"]
    assert status == 200 and body["caption"] and body["model_version"] == "1"
    assert answers["text"][0] == 415 and answers["text"][1]["kind"] == "not_image"
    assert answers["beam"][0] == 400 and "beam_size" in answers["beam"][1]["error"]
    assert answers["model"]["registry_version"] == "1" and answers["model"]["source"] == "bento:captioner:v1"


def test_container_is_non_root_read_only_and_checks_its_health(offline_container, first_release):
    assert podman("exec", offline_container, "id", "-u").stdout.strip() == "1034"
    outside = podman(
        "exec", offline_container, "sh", "-c", "touch /opt/bento/x /x /data/x 2>&1; echo $?", check=False
    ).stdout
    assert "Read-only file system" in outside
    assert podman("exec", offline_container, "sh", "-c", "touch /tmp/x && echo ok").stdout.strip() == "ok"
    inspected = json.loads(podman("image", "inspect", first_release).stdout)[0]
    config = inspected["Config"]
    assert config["User"] == "1034:1034"
    assert "bento" in " ".join(inspected["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["BENTOML_DO_NOT_TRACK"] == "true" and env["DO_NOT_TRACK"] == "1"
    assert env["CAPTIONING_MODEL"] == "bento:captioner:v1"
    assert podman("healthcheck", "run", offline_container, check=False).returncode == 0


def test_an_image_is_reused_only_for_the_same_package(workspace, packages, tmp_path):
    """After a registry reset, version 1 may be another model: its old image is rebuilt, not reused."""
    from captioning.inference.model_package import package_digest
    from captioning.release.container_image import PACKAGE_LABEL, image_label
    from tests.container.conftest import register, run_cli

    repo = "localhost/captioning-test-reset"
    env = {**workspace, "CAPTIONING_IMAGE_REPO": repo}

    def release_in(registry: str) -> dict:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / registry}"
        result = run_cli("release", "--json", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    try:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'first.db'}"
        assert register(packages[0], env).version == "1"
        assert release_in("first.db")["built"]
        assert image_label(f"{repo}:v1", PACKAGE_LABEL) == package_digest(packages[0])

        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'reset.db'}"  # a new registry: v1 is another model
        assert register(packages[1], env).version == "1"
        rebuilt = release_in("reset.db")
        assert rebuilt["built"], "the image of another package under the same version is rebuilt, not reused"
        assert image_label(f"{repo}:v1", PACKAGE_LABEL) == package_digest(packages[1]) == rebuilt["package_sha256"]

        assert not release_in("reset.db")["built"], "the same package again: the image is reused"
    finally:
        podman("rmi", "--force", f"{repo}:v1", check=False)
