"""A release's Kubernetes overlay reaches a cluster only through the kubectl context
`release.kube_context` names: the current context is never assumed (it may be a production
cluster that cannot pull a localhost/ image, or a stale one), and a failed apply does not fail the
release. Real kubectl with a kubeconfig of two clusters, each a TCP listener on 127.0.0.1 that
counts the connections it gets and closes them."""

from __future__ import annotations

import shutil
import socket
import threading

import pytest
import yaml

from captioning.release.build import kubernetes_release


class Listener:
    """A cluster address that counts the connections kubectl opens to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def clusters(tmp_path, monkeypatch):
    """A kubeconfig whose current context is `production`, with a second context `staging`."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is missing: run `make system-deps`")
    listeners = {"production": Listener(), "staging": Listener()}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": f"https://127.0.0.1:{listener.port}"}}
            for name, listener in listeners.items()
        ],
        "users": [{"name": "someone", "user": {"token": "not-a-token"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "someone"}} for name in listeners],
        "current-context": "production",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    yield listeners
    for listener in listeners.values():
        listener.close()


def test_without_a_named_context_the_overlay_is_rendered_and_applied_nowhere(clusters):
    done = kubernetes_release("9", "localhost/captioning:v9", context="")
    assert done["applied"] is False and done["error"] == "" and done["context"] == ""
    rendered = open(done["rendered"], encoding="utf-8").read()
    assert "image: localhost/captioning:v9" in rendered
    assert clusters["production"].connections == 0 and clusters["staging"].connections == 0


def test_a_named_context_is_the_only_cluster_asked_and_its_failure_is_reported_not_raised(clusters):
    done = kubernetes_release("9", "localhost/captioning:v9", context="staging")
    assert done["applied"] is False and done["context"] == "staging"
    assert f"127.0.0.1:{clusters['staging'].port}" in done["error"]
    assert clusters["staging"].connections > 0 and clusters["production"].connections == 0
