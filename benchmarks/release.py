"""Release benchmark: image size, cold and warm builds, and the progressive rollout of a new champion.

    python -m benchmarks.release [--clients 4] [--requests 200] [--port 3400]

In a workspace of its own (registry, artifacts, stack, Prefect home, images under
localhost/captioning-bench, a base image and wheel cache made anew, so the first build is cold),
with the release settings of params.yaml as they are (`release.*`: smoke, shadow over 30 s,
canary steps 10, 50 and 100 % of 30 s each, the watcher polling every 10 s), and `--clients`
clients sending a synthetic photo to /caption one request after the other all along:

1. Three tiny models are trained on the synthetic data: two good ones (2 and 3 epochs) and an
   untrained one (learning rate 1e-9). Every version is registered as registration does it,
   its smoke photos and captions recorded with it (captioning/release/smoke.py `registering`),
   and made champion with the gates set aside.
2. Version 1: a cold `captioning release` (base image, wheels, torch layer, model), then
   `make up` (scripts/up.sh: the stack and the release watcher) until ready.
3. Healthy promotion of version 2: the watcher releases it and rolls it out. For each stage
   (the watcher's poll and the warm build, the candidate's start, smoke, shadow, each canary
   step, promote): its duration, the client requests sent during it and the versions that
   answered them; the whole rollout from the alias change to every replica on version 2.
4. Rollback to the version kept warm (`captioning registry rollback`).
5. Bad candidates, each made champion in turn while version 1 serves: the good package whose
   container fails every caption (the drill of `captioning stack drill --fail-captions`), the
   untrained model, and the good package 6 s slower per batch (`captioning stack drill
   --delay-ms 6000`); a drill's faults reach the next rollout's candidate model servers only. For each: the stage that refused it and why, the seconds
   from the alias change to the verdict and to the end of the rollback (the candidate stopped,
   the champion alias back on version 1), the client requests during it, those the candidate
   answered, and the failed ones.

Writes reports/benchmark_release.json. A scenario that goes wrong ends the run with what it saw
and the end of the watcher's log; the stack, the watcher and the Prefect server are stopped (by
their pids) and the images built are removed in every case. Run it alone on a quiet machine:
20 to 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import write_report  # noqa: E402
from captioning.config import disable_telemetry  # noqa: E402
from harness.workspace import workspace_env  # noqa: E402

disable_telemetry()

ROLLOUT_SECONDS = 1200  # a rollout's bound; with the default windows one takes 2 to 6 minutes
POLL_SECONDS = 0.5  # how often the stack's state and the clients' counts are read
SLOW_DELAY_MS = 6000  # the slow candidate: p95 far above release.canary.max_p95_seconds (5 s)
BAD_CANDIDATES = {  # name: (package, the drill's faults for its model servers)
    "fails_every_caption": ("good", {"fail_captions": True}),
    "untrained": ("untrained", {}),
    "slow": ("good", {"delay_ms": SLOW_DELAY_MS}),
}


@dataclass
class Bench:
    """The workspace and what the scenarios share."""

    env: dict[str, str]
    port: int
    settings: Any  # params.yaml as it is
    clients: int
    minimum: int
    photo: bytes
    versions: list[str] = field(default_factory=list)  # registered, so their images are removed

    @property
    def stack_dir(self) -> Path:
        return Path(self.env["CAPTIONING_STACK_DIR"])

    @property
    def tracking(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def workspace(home: Path, port: int) -> dict[str, str]:
    env = workspace_env(
        home,
        "captioning-bench",
        CAPTIONING_CONTAINER_CACHE=str(home / "cache"),
        CAPTIONING_BASE_IMAGE="localhost/captioning-base:bench",
        PORT=str(port),
        PREFECT_PORT=str(port + 20),
    )
    # The defaults of params.yaml, whatever this shell sets; the clients send no API key.
    for name in ("CAPTIONING_PARAMS_OVERLAY", "CAPTIONING_API_KEY"):
        env.pop(name, None)
    return env


def check_ports(port: int) -> None:
    """The stack's ports (P..P+10) and Prefect's (P+20) must be free: up.sh refuses a server it did not start."""
    for number in [*range(port, port + 11), port + 20]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", number))
            except OSError:
                sys.exit(f"port {number} is taken: choose another block with --port")


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return round(time.perf_counter() - started, 1)


def train_packages(home: Path) -> dict[str, Path]:
    """Versions 1 and 2 as the container tests train them (the second trained longer, so that it
    passes the smoke comparison with the first), and a model that learnt nothing."""
    from harness.trained import train_tiny_model

    return {
        "first": train_tiny_model(home / "first", decoder="attention", epochs=2),
        "good": train_tiny_model(home / "good", decoder="attention", epochs=3),
        "untrained": train_tiny_model(home / "untrained", decoder="attention", epochs=1, lr=1e-9),
    }


def register_package(bench: Bench, package: Path) -> str:
    """Register `package` with its smoke photos (the synthetic validation scenes it was chosen on)
    and make it champion, the gates set aside; returns its version."""
    from captioning.registry.versions import register
    from captioning.release.smoke import registering
    from harness.trained import synthetic_data

    with synthetic_data(), registering(package, bench.settings) as logged:
        result = register(
            logged, {"CIDEr": 10.0}, "synthetic[test]", bench.settings, gates={}, tracking=bench.tracking, lineage={}
        )
    if not result.promoted:
        sys.exit(f"version {result.version} was not made champion: {result.message}")
    bench.versions.append(result.version)
    return result.version


# --------------------------------------------------------------------------- reading the stack


def read_state(bench: Bench) -> dict:
    path = bench.stack_dir / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def watch_log(bench: Bench) -> str:
    path = bench.stack_dir / "watch.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def fail(bench: Bench, message: str, figures: dict | None = None) -> NoReturn:
    """End the run: what went wrong, what was measured of it, and the end of the watcher's log."""
    shown = f"\n{json.dumps(figures, indent=2, default=str)}" if figures else ""
    sys.exit(f"{message}{shown}\n--- end of {bench.stack_dir / 'watch.log'}:\n{watch_log(bench)[-4000:]}")


def served(bench: Bench) -> str | None:
    import requests

    try:
        return requests.get(bench.url + "/model", timeout=30).json().get("registry_version")
    except (requests.RequestException, ValueError):
        return None


def rolled_out(state: dict, version: str) -> bool:
    """Every replica of the stack runs `version` (no rollout under way, both model servers on it)."""
    return state.get("version") == version and not state.get("rollout") and len(state["slots"]["model"]) == 2


def serving_versions(bench: Bench) -> set[str]:
    """The versions of the model servers and APIs that run, as the stack's Prometheus labels them."""
    from captioning.release import stack

    status = stack.status()
    if not status["running"]:
        fail(bench, "the stack is no longer running")
    return {version for slots in status.get("versions", {}).values() for version in slots.values()}


# --------------------------------------------------------------------------- traffic over time


def counts_at(samples: list[tuple[float, dict]], moment: float) -> dict:
    """The clients' counts of the last sample taken at or before `moment`."""
    chosen = samples[0][1]
    for taken, counts in samples:
        if taken > moment:
            break
        chosen = counts
    return chosen


def between(samples: list[tuple[float, dict]], start: float, end: float) -> dict:
    """Client requests sent from `start` to `end` (wall-clock times), failed ones, and who answered."""
    first, last = counts_at(samples, start), counts_at(samples, end)
    by_version = {v: n - first["by_version"].get(v, 0) for v, n in last["by_version"].items()}
    return {
        "requests": sum(last["by_status"].values()) - sum(first["by_status"].values()),
        "failed": last["failed"] - first["failed"],
        "by_version": {v: n for v, n in sorted(by_version.items()) if n},
    }


def first_answer(samples: list[tuple[float, dict]], version: str, since: float) -> float | None:
    """Seconds from `since` to the first sample in which `version` answered one more client request."""
    before = counts_at(samples, since)["by_version"].get(version, 0)
    for taken, counts in samples:
        if taken >= since and counts["by_version"].get(version, 0) > before:
            return round(taken - since, 1)
    return None


# --------------------------------------------------------------------------- following a rollout


def follow(bench: Bench, loop, version: str, changed_at: float) -> tuple[dict, list, float | None]:
    """Poll until the watcher's rollout of `version` ended: (its record, the clients' counts over
    time, when its candidate model server was first seen ready)."""
    samples, ready_at = [(changed_at, loop.counts())], None
    ended = f"release-v{version}:"  # the watcher's line once the release flow of `version` returned
    while time.time() - changed_at < ROLLOUT_SECONDS:
        log = watch_log(bench)  # read before the state: a rollout's record is written before its line
        state, now = read_state(bench), time.time()
        samples.append((now, loop.counts()))
        plan = state.get("rollout") or {}
        if ready_at is None and plan.get("version") == version and plan["candidate"]["model"]:
            ready_at = now
        last = state.get("last_rollout") or {}
        if last.get("version") == version:
            return last, samples, ready_at
        if ended in log:
            fail(bench, f"the release of version {version} ended without a rollout")
        time.sleep(POLL_SECONDS)
    fail(bench, f"the rollout of version {version} did not end within {ROLLOUT_SECONDS} s")


def stage_windows(rollout: dict, changed_at: float, ready_at: float | None) -> list[tuple[str, float, float, dict]]:
    """(stage, start, end, verdict) of each part of a rollout, wall-clock times from the alias change:
    the watcher's poll and the build, the candidate's start, each verdict, then promote or rollback."""
    started, verdicts = rollout["started_at"], rollout["verdicts"]
    windows = [("release (watcher poll, warm build)", changed_at, started, {})]
    begin = started
    first_verdict = started + verdicts[0]["at_seconds"] if verdicts else rollout["finished_at"]
    if ready_at is not None and ready_at <= first_verdict:
        windows.append(("candidate start", started, ready_at, {}))
        begin = ready_at
    for verdict in verdicts:
        end = started + verdict["at_seconds"]
        windows.append((verdict["stage"], begin, end, verdict))
        begin = end
    last = "promote" if rollout["outcome"] == "promoted" else "rollback"
    windows.append((last, begin, rollout["finished_at"], {}))
    return windows


def stages_report(windows: list, samples: list) -> list[dict]:
    return [
        {
            "stage": name,
            "outcome": verdict.get("outcome"),
            "seconds": round(end - start, 1),
            **between(samples, start, end),
            "reason": verdict.get("reason"),
        }
        for name, start, end, verdict in windows
    ]


def under_traffic(bench: Bench, package: Path, faults: dict | None = None) -> dict:
    """Register `package` as champion while the clients send requests and follow its rollout to
    the end; `faults`: a drill for its candidate's model servers (taken by the next rollout)."""
    from captioning.release import rollout
    from captioning.release.traffic import RequestLoop

    loop = RequestLoop(
        bench.url, bench.photo, clients=bench.clients, max_requests=1_000_000, max_seconds=ROLLOUT_SECONDS + 600
    )
    with loop:
        if faults:
            rollout.drill(**faults)
        asked = time.time()
        version = register_package(bench, package)
        changed_at = time.time()  # registration returned: the champion alias names `version`
        record, samples, ready_at = follow(bench, loop, version, changed_at)
        deadline = time.monotonic() + 120
        while loop.requests < bench.minimum and time.monotonic() < deadline:
            time.sleep(0.5)
    windows = stage_windows(record, changed_at, ready_at)
    end = record["finished_at"]
    return {
        "version": version,
        "outcome": record["outcome"],
        "registration_seconds": round(changed_at - asked, 1),
        "alias_change_to_rollout_start_seconds": round(record["started_at"] - changed_at, 1),
        "rollout_start_to_end_seconds": record["seconds"],
        "alias_change_to_end_seconds": round(end - changed_at, 1),
        "first_answer_by_candidate_seconds": first_answer(samples, version, changed_at),
        "stages": stages_report(windows, samples),
        "traffic": between(samples, changed_at, end),
        "first_failures": loop.summary()["first_failures"],
        "verdicts": record["verdicts"],
    }


def build_seconds(bench: Bench, version: str) -> float | None:
    path = Path(bench.env["CAPTIONING_ARTIFACTS_DIR"]) / "release" / f"v{version}" / "release.json"
    return json.loads(path.read_text())["build_seconds"] if path.is_file() else None


# --------------------------------------------------------------------------- the scenarios


def healthy(bench: Bench, package: Path) -> dict:
    """A good new version through every stage to every replica."""
    stable = read_state(bench).get("version")
    figures = under_traffic(bench, package)
    version = figures.pop("version")
    figures.pop("verdicts")
    if figures["outcome"] != "promoted":
        fail(bench, f"the healthy version {version} was not promoted", figures)
    state = read_state(bench)
    if not rolled_out(state, version) or served(bench) != version:
        fail(bench, f"version {version} promoted, but not every replica serves it: {state}", figures)
    return {
        "version": version,
        "stable": stable,
        "warm_build_seconds": build_seconds(bench, version),
        "alias_change_to_every_replica_seconds": figures.pop("alias_change_to_end_seconds"),
        **figures,
    }


def warm_rollback(bench: Bench) -> dict:
    """`captioning registry rollback` while the previous version is kept warm: its model server takes
    the traffic back at once, a second one starts, the current ones stop, then the API follows."""
    from captioning.release.traffic import RequestLoop

    command = [sys.executable, "-m", "captioning.cli", "registry", "rollback", "--json"]
    offset, api_before = len(watch_log(bench)), set(read_state(bench)["slots"]["api"])
    with RequestLoop(bench.url, bench.photo, clients=bench.clients, max_seconds=ROLLOUT_SECONDS + 600) as loop:
        result = subprocess.run(command, env=bench.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            fail(bench, f"captioning registry rollback failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        version, changed_at = json.loads(result.stdout)["champion"], time.time()
        samples, switched, ended = [(changed_at, loop.counts())], None, f"release-v{version}:"
        while True:
            log = watch_log(bench)[offset:]  # read before the state: the state is written before the line
            state, now = read_state(bench), time.time()
            samples.append((now, loop.counts()))
            if switched is None and state.get("version") == version:
                switched = round(now - changed_at, 1)
            if (
                rolled_out(state, version)
                and len(state["slots"]["api"]) == 1
                and not api_before & set(state["slots"]["api"])
            ):
                break  # both model servers and the API on `version`
            if ended in log or now - changed_at > ROLLOUT_SECONDS:
                fail(bench, f"the rollback to version {version} did not end with every replica on it: {state}")
            time.sleep(POLL_SECONDS)
    if served(bench) != version:
        fail(bench, f"the stack's API reports version {served(bench)} after the rollback to version {version}")
    return {
        "version": version,
        "first_answer_by_it_seconds": first_answer(samples, version, changed_at),
        "alias_change_to_both_model_servers_seconds": switched,
        "alias_change_to_every_replica_seconds": round(now - changed_at, 1),
        "traffic": between(samples, changed_at, now),
        "first_failures": loop.summary()["first_failures"],
    }


def refused(bench: Bench, name: str, package: Path, faults: dict) -> dict:
    """A bad candidate made champion: the stage that refused it, how fast it was gone, who it answered."""
    from captioning.registry.refusals import refused_reason
    from captioning.registry.versions import champion_query

    stable = read_state(bench).get("version")
    figures = under_traffic(bench, package, faults)
    version, verdicts = figures.pop("version"), figures.pop("verdicts")
    if figures["outcome"] != "rolled back":
        fail(bench, f"the bad candidate {name!r} (version {version}) was {figures['outcome']}", figures)
    refusal = verdicts[-1]
    model = bench.settings.register.model_name
    return {
        "version": version,
        "stable": stable,
        "faults": faults,
        "refused_at": refusal["stage"],
        "reason": refusal["reason"],
        "check": refusal.get("check"),
        "figure": refusal.get("figure"),
        "threshold": refusal.get("threshold"),
        "alias_change_to_verdict_seconds": round(
            figures["alias_change_to_rollout_start_seconds"] + refusal["at_seconds"], 1
        ),
        "alias_change_to_rolled_back_seconds": figures.pop("alias_change_to_end_seconds"),
        "client_requests": figures["traffic"]["requests"],
        "answered_by_candidate": figures["traffic"]["by_version"].get(version, 0),
        "failed_requests": figures["traffic"]["failed"],
        "champion_back_on_stable": champion_query(bench.tracking, model)[0] == stable,
        "candidate_stopped": version not in serving_versions(bench),
        "tagged_refused": refused_reason(bench.tracking, model, version) == refusal["reason"],
        "build_seconds": build_seconds(bench, version),
        **figures,
    }


# --------------------------------------------------------------------------- the run


def measure(bench: Bench, packages: dict[str, Path]) -> dict:
    from captioning.release.container_image import image_ref, image_size

    register_package(bench, packages["first"])
    cold = timed([sys.executable, "-m", "captioning.cli", "release"], bench.env)
    up = timed(["bash", "scripts/up.sh"], bench.env)
    promotion = healthy(bench, packages["good"])
    rollback = warm_rollback(bench)  # while version 1 is still kept warm (release.keep_previous_seconds)
    bad = {name: refused(bench, name, packages[which], faults) for name, (which, faults) in BAD_CANDIDATES.items()}
    return {
        "image_bytes": {f"v{v}": image_size(image_ref(v)) for v in bench.versions[:2]},
        "build_cold_seconds": cold,
        "build_warm_seconds": promotion["warm_build_seconds"],
        "up_seconds": up,
        "promotion": promotion,
        "rollback_to_warm": rollback,
        "bad_candidates": bad,
    }


def stop_pid(pid_file: Path, word: str) -> None:
    """Stop the process `pid_file` names when it runs and its command line holds `word` (a pid file
    outlives its process and the kernel reuses pids); wait up to 20 s for it to end."""
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return
    if word not in command:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if Path(f"/proc/{pid}").exists():
        print(f"process {pid} ({command[:80]}) still runs 20 s after SIGTERM", file=sys.stderr)


def stop_everything(bench: Bench) -> None:
    """`make down` (the watcher, then the stack); the stack from here if that failed; the watcher
    and the Prefect server up.sh started, by their pids; the images built."""
    from captioning.release import stack
    from captioning.release.container_image import image_ref, podman

    try:
        down = subprocess.run(
            ["bash", "scripts/down.sh"], env=bench.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600
        )
        failed = down.returncode != 0 and f"{down.stdout[-1000:]}\n{down.stderr[-2000:]}"
    except subprocess.TimeoutExpired:
        failed = "no end after 600 s"
    if failed:
        print(f"make down failed: {failed}\nstopping the stack from here", file=sys.stderr)
        try:
            stack.down()
        except Exception as error:  # noqa: BLE001 - reported; the rest must still be stopped
            print(f"the stack could not be stopped: {error}", file=sys.stderr)
    stop_pid(bench.stack_dir / "watch.pid", "flows.release")
    stop_pid(Path(bench.env["PREFECT_HOME"]) / "server.pid", "prefect")
    for version in bench.versions:
        podman("rmi", "--force", image_ref(version), check=False)
    podman("rmi", "--force", bench.env["CAPTIONING_BASE_IMAGE"], check=False)


def run(home: Path, port: int, clients: int, minimum: int) -> dict:
    from captioning.config import PARAMS_FILE
    from captioning.settings import load_settings
    from harness.serving import synthetic_jpeg

    check_ports(port)
    env = workspace(home, port)
    # The drill, the stack's state and the image names read these in this process too.
    os.environ.update({k: env[k] for k in ("CAPTIONING_IMAGE_REPO", "CAPTIONING_STACK_DIR")})
    packages = train_packages(home)
    # The clients' photo: a synthetic scene, the kind the tiny models were trained on; two tiny
    # models caption a photo of another kind each its own way, which the shadow stage would read
    # as disagreement (tests/container/test_rollout.py sends the same one).
    photo = synthetic_jpeg(seed=5)
    bench = Bench(env, port, load_settings(PARAMS_FILE), clients, minimum, photo)
    try:
        report = measure(bench, packages)
    finally:
        stop_everything(bench)
    report["release_settings"] = bench.settings.release.to_dict()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="clients sending requests during each scenario")
    parser.add_argument("--requests", type=int, default=200, help="at least this many client requests per scenario")
    parser.add_argument("--port", type=int, default=3400, help="the stack's port P (P..P+10 and P+20 must be free)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="captioning-release-bench-", ignore_cleanup_errors=True) as home:
        report = run(Path(home), args.port, args.clients, args.requests)
    report.update(
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        how=(
            "python -m benchmarks.release, alone on the machine; tiny models trained on synthetic data; "
            "the first release builds the base image, gathers wheels and installs torch; the release settings "
            "of params.yaml as they are (release_settings); "
            f"{args.clients} clients each sending a synthetic photo to /caption one request after the other. "
            "Each rollout is timed from the alias change (registration returned) with the watcher's own "
            "times (rollout start, each verdict, end); a stage's requests are those the clients sent between "
            f"its start and end, read every {POLL_SECONDS} s (so within that of its bounds; the candidate's "
            "start is seen from the stack's state at the same rate). Versions made champion with the gates "
            "set aside; bad candidates: failing every caption and 6 s slower per batch (drills on the "
            "candidate's model servers), and a model trained with a learning rate of 1e-9"
        ),
    )
    print(json.dumps(report, indent=2))
    print(f"written to {write_report(report, 'release')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
