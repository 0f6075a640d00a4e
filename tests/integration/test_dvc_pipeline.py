"""`dvc repro` of dvc.yaml in a temporary git copy of the project, on a small synthetic dataset.

Three runs: the whole pipeline; again with nothing changed (every stage skipped); and an
experiment with another learning rate (`dvc exp run -S train.lr=...`), which re-runs train,
evaluate and register only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captioning.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

STAGES = ["acquire", "validate", "features", "train", "evaluate", "register"]

# Small settings: 48 + 16 + 16 synthetic images, a tiny decoder, one epoch, greedy decoding.
SMALL = {
    "data": {
        "dataset": "synthetic",
        "train_query": "synthetic[train]",
        "val_query": "synthetic[val]",
        "test_query": "synthetic[test]",
    },
    "synthetic": {"train": 48, "val": 16, "test": 16, "image_size": 96},
    "features": {"batch_size": 16},
    "vocab": {"min_freq": 1},
    "model": {"embed_dim": 32, "hidden_dim": 64, "attention_dim": 32},
    "train": {"epochs": 1, "batch_size": 32, "warmup_steps": 0, "val_images": 16, "progress": False},
    "decoding": {"beam_size": 1},
    "evaluate": {"beam_sizes": [1]},
    "register": {"gates": {"min": {"CIDEr": 0.0, "BLEU-4": 0.0}, "margin": {}}},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Records of this checkout's own runs (the data it acquired, the stages it ran): a fresh project has neither.
LOCAL_STATE = {"data.dvc", "dvc.lock"}


def _project_files() -> list[str]:
    """What a commit of the project holds: tracked files plus new files git does not ignore,
    without the checkout's own DVC state."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.split("\0") if name and name not in LOCAL_STATE and (PROJECT_ROOT / name).is_file()]


def _env(repo: Path) -> dict[str, str]:
    """The CLI of the copy (PYTHONPATH), its folders and MLflow store, the venv's commands first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CAPTIONING_", "MLFLOW_", "PREFECT_")) and k != "PYTHONPATH"
    }
    env.update(
        PYTHONPATH=str(repo),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DO_NOT_TRACK="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        OMP_NUM_THREADS="2",
    )
    return env


def _run(args: list[str], repo: Path, env: dict[str, str], timeout: int = 600) -> str:
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{output[-4000:]}"
    return output


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("dvc-project") / "project"
    for name in _project_files():
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, target)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(_merge(params, SMALL), sort_keys=False))
    env = _env(repo)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "project copy"], repo, env)
    env["DVC"] = dvc
    return repo, env


def test_repro_runs_every_stage_then_nothing(repo):
    repo, env = repo
    dvc = env["DVC"]
    first = _run([dvc, "repro"], repo, env)
    assert _ran(first) == STAGES

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())["metrics"]
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(metrics)
    registration = json.loads((repo / "reports" / "registration.json").read_text())
    assert registration["promoted"] is True and registration["champion"] == "1"
    assert (repo / "artifacts" / "train" / "model" / "weights.pt").is_file()
    history = (repo / "reports" / "training_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 2  # header + one epoch
    # Stage outputs stay out of data/, which data.dvc would track.
    for stage in lock["stages"].values():
        assert all(not out["path"].startswith("data/") for out in stage.get("outs", []))

    second = _run([dvc, "repro"], repo, env)
    assert _ran(second) == []
    assert all(f"Stage '{stage}' didn't change, skipping" in second for stage in STAGES)

    shown = json.loads(_run([dvc, "metrics", "show", "--json"], repo, env))
    assert "reports/metrics.json" in json.dumps(shown) and "candidate greedy" in json.dumps(shown)
    _run([dvc, "plots", "show", "-o", str(repo / "plots")], repo, env)
    page = (repo / "plots" / "index.html").read_text()
    assert "Training loss" in page and "Validation CIDEr" in page


def test_experiment_with_another_learning_rate_reruns_from_train(repo):
    repo, env = repo
    dvc = env["DVC"]
    if not (repo / "dvc.lock").is_file():
        pytest.skip("needs the first repro")
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "first repro"], repo, env)
    output = _run([dvc, "exp", "run", "-S", "train.lr=0.002", "--name", "lr-2e-3"], repo, env)
    assert _ran(output) == ["train", "evaluate", "register"]
    for stage in ("acquire", "validate", "features"):
        assert f"Stage '{stage}' didn't change, skipping" in output

    table = json.loads(_run([dvc, "exp", "show", "--json"], repo, env))
    text = json.dumps(table)
    assert "lr-2e-3" in text and "0.002" in text
