"""The commit a model records is "-dirty" only when code changed: data records and settings do not count."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from captioning.registry.lineage import git_commit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "test@example.org")
    git(tmp_path, "config", "user.name", "test")
    (tmp_path / "captioning").mkdir()
    (tmp_path / "captioning" / "model.py").write_text("x = 1\n")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "code")
    return tmp_path


def test_a_clean_checkout_records_its_commit(repo):
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD")


def test_data_records_and_settings_leave_the_code_clean(repo):
    (repo / "data.dvc").write_text("outs:\n- md5: 0ef0.dir\n  path: data\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "more.dvc").write_text("outs: []\n")
    git(repo, "add", "data.dvc", "sub/more.dvc")  # what `dvc add` with autostage does on a first run
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "params.yaml").write_text("train:\n  lr: 0.0003\n")  # `dvc exp run -S train.lr=3e-4`
    assert not git_commit(repo).endswith("-dirty")


def test_a_changed_code_file_is_dirty(repo):
    (repo / "data.dvc").write_text("outs: []\n")
    git(repo, "add", "data.dvc")
    (repo / "captioning" / "model.py").write_text("x = 2\n")
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD") + "-dirty"


def test_outside_git_there_is_no_commit(tmp_path):
    assert git_commit(tmp_path) is None
