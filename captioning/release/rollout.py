"""A new champion earns its traffic on the local stack: smoke, shadow, canary, promote.

    plan = begin(settings, image, version)   # the candidate's model server, in haproxy at weight 0
    smoke(plan, settings, tracking)          # its own container captions photos with references
    shadow(plan, settings)                   # the API copies live requests to it, answers discarded
    canary(plan, settings)                   # a growing share of real traffic, analysed at each step
    promote(plan, settings)                  # all replicas on it; the previous version kept warm
    rollback(plan, verdict, tracking, name)  # any breach: candidate out at once, alias back, tagged

Each stage returns a `Verdict` (captioning/release/analysis.py). The release flow runs them as
tasks, one after the other, and rolls back on the first that fails. The rollout's progress lives
in the stack's state (`state["rollout"]`), so `captioning stack status` shows it and
`captioning stack promote|abort` can end it by hand (a control file the stages read).

An analysis without enough traffic to judge (fewer requests than its minimum in its window) is
inconclusive: the stage goes on and says so, since the smoke stage has already judged the
captions and an idle stack would otherwise never finish a rollout.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Callable

from captioning.release import haproxy, pods, stack
from captioning.release.analysis import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    Limits,
    Prometheus,
    Verdict,
    wait_for_verdict,
)

CONTROL = "control.json"
DRILL = "drill.json"
SMOKE_SLOT_SECONDS = 180


class RolloutError(RuntimeError):
    """The stack cannot take this rollout (none running, another in progress, no free slot)."""


# --------------------------------------------------------------------------- the plan


def begin(settings, image: str, version: str) -> dict:
    """Start the candidate's model server beside the stable ones, at weight 0 (no traffic)."""
    with stack.locked():
        state = stack.read_state()
        if state is None or not stack.running(state):
            raise RolloutError("no stack is running: start one with `make up`")
        if state.get("rollout"):
            raise RolloutError(f"version {state['rollout']['version']} is being rolled out; abort it first")
        drop_previous(state)
        clear_control()
        plan = {
            "version": str(version),
            "image": image,
            "stable": {"version": state.get("version", ""), "image": state["image"]},
            "stage": "candidate",
            "candidate": {"model": [], "api": []},
            "env": take_drill(),
            "verdicts": [],
            "started_at": time.time(),
        }
        state["rollout"] = plan
        stack.write_state(state)
        taken = _taken(state, "model")
        slot = stack.add_replica(state["port"], "model", image, taken, plan["version"], 0, plan["env"])
        plan["candidate"]["model"].append(slot)
        _save(plan)
        return plan


def _taken(state: dict, role: str) -> set[int]:
    taken = set(state["slots"][role])
    rollout = state.get("rollout") or {}
    taken |= set(rollout.get("candidate", {}).get(role, []))
    previous = state.get("previous") or {}
    if role == "model" and previous.get("slot") is not None:
        taken.add(previous["slot"])
    return taken


def current(version: str) -> dict:
    """The plan of the rollout of `version` in progress (RolloutError when the stack has another)."""
    state = stack.read_state() or {}
    plan = state.get("rollout")
    if not plan or plan["version"] != str(version):
        running = plan["version"] if plan else "none"
        raise RolloutError(f"version {version} is not being rolled out (in progress: {running})")
    return plan


def _save(plan: dict) -> None:
    state = stack.read_state() or {}
    state["rollout"] = plan
    stack.write_state(state)


def record(plan: dict, verdict: Verdict) -> Verdict:
    plan["verdicts"].append({**verdict.to_dict(), "at_seconds": round(time.time() - plan["started_at"], 1)})
    plan["stage"] = verdict.stage
    _save(plan)
    return verdict


# --------------------------------------------------------------------------- control by hand


def request(action: str) -> None:
    """`captioning stack promote|abort`: what the running rollout does at its next look."""
    if action not in ("promote", "abort"):
        raise ValueError(f"action must be promote or abort, not {action!r}")
    path = stack.stack_dir() / CONTROL
    path.write_text(json.dumps({"action": action, "at": time.time()}), encoding="utf-8")


def requested() -> str | None:
    path = stack.stack_dir() / CONTROL
    try:
        return json.loads(path.read_text(encoding="utf-8"))["action"]
    except (OSError, ValueError, KeyError):
        return None


def clear_control() -> None:
    (stack.stack_dir() / CONTROL).unlink(missing_ok=True)


def drill(delay_ms: int = 0, fail_captions: bool = False) -> dict[str, str]:
    """`captioning stack drill`: the next rollout's candidate model servers start with these faults
    (slower by `delay_ms` per batch, or failing every caption), to see the stages stop it."""
    env = {}
    if delay_ms:
        env["CAPTIONING_FAULT_DELAY_MS"] = str(int(delay_ms))
    if fail_captions:
        env["CAPTIONING_FAULT_FAIL_CAPTIONS"] = "1"
    if not env:
        raise ValueError("a drill needs a fault: a delay or failing captions")
    (stack.stack_dir() / DRILL).write_text(json.dumps(env), encoding="utf-8")
    return env


def take_drill() -> dict[str, str]:
    """The faults `drill` asked for, once: the rollout that starts next takes them."""
    path = stack.stack_dir() / DRILL
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    path.unlink(missing_ok=True)
    return env


def by_hand(stage: str) -> Verdict | None:
    """A verdict that a person asked for, if any: abort fails the stage, promote passes it."""
    action = requested()
    if action == "abort":
        return Verdict(FAILED, stage=stage, reason=f"{stage}: aborted by hand (captioning stack abort)", check="abort")
    if action == "promote":
        return Verdict(PASSED, stage=stage, reason=f"{stage}: promoted by hand (captioning stack promote)")
    return None


# --------------------------------------------------------------------------- smoke


def smoke(version: str, settings, tracking: str | None, report: Callable[[str], None] = print) -> Verdict:
    """The candidate's own API and model server caption the smoke photos recorded with its
    registered version; judged against those captions and the stable version's score."""
    from captioning.release import smoke as checks

    plan = current(version)
    stage = "smoke"
    options = settings.release.smoke
    recorded, folder = _smoke_record(settings, tracking, plan["version"])
    if recorded is None:
        reason = f"{stage}: version {plan['version']} was registered without smoke captions ({folder} is missing)"
        return record(plan, Verdict(FAILED, stage=stage, reason=reason, check="smoke record"))
    served = _caption_with_candidate(plan, folder)
    stable = _stable_score(plan, settings, tracking, recorded, folder, report)
    margin = 0.0 if stable is None else options.max_drop * stable
    judged = checks.judge_smoke(
        served, recorded, stable, margin, options.tolerance, options.max_repeats, options.max_latency_seconds
    )
    report(judged.reason)
    return record(plan, judged)


def _smoke_record(settings, tracking: str | None, version: str) -> tuple[dict | None, Path]:
    from captioning.registry.locate import locate
    from captioning.release.smoke import RECORD_FILE, SMOKE_DIR, load_record

    package = locate(f"models:/{settings.register.model_name}/{version}", tracking).path
    folder = Path(package) / SMOKE_DIR
    return (load_record(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else None), folder


def _caption_with_candidate(plan: dict, folder: Path) -> dict[str, dict]:
    """A candidate API pod, outside haproxy, in front of the candidate's model server alone."""
    from captioning.release.smoke import caption_over_http

    state = stack.read_state()
    port, p = state["port"], stack.ports(state["port"])
    slot = stack.free_slot("api", _taken(state, "api"))
    model_url = f"http://127.0.0.1:{p['slots']['model'][plan['candidate']['model'][0]]}"
    env = {**stack.replica_env(port, "api", plan["version"]), "model_url": model_url}
    plan["candidate"]["api"].append(slot)
    _save(plan)
    pods.start("api", slot, plan["image"], p, stack.stack_dir(), env)
    url = f"http://127.0.0.1:{p['slots']['api'][slot]}"
    try:
        _wait_answering(url, "api", slot)
        return caption_over_http(url, folder, headers=stack.client_headers())
    finally:
        pods.stop("api", slot)
        plan["candidate"]["api"].remove(slot)
        _save(plan)


def _wait_answering(url: str, role: str, slot: int, seconds: float = SMOKE_SLOT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if "Exited" in pods.state(role, slot):
            break
        time.sleep(1)
    raise stack.StackError(f"the candidate's {role} at {url} did not become ready:\n{pods.log(role, slot)}")


def _stable_score(plan, settings, tracking, recorded: dict, folder: Path, report) -> float | None:
    """The stable version's score on the same photos: from its own smoke record when it is of
    the same set, else by captioning them through the stack (the stable version serves it all)."""
    from captioning.release import smoke as checks

    stable = plan["stable"]["version"]
    if not stable:
        return None
    own, _ = _smoke_record(settings, tracking, stable)
    if own is not None and own.get("set_digest") == recorded.get("set_digest"):
        return checks.stable_record_score(own, recorded)
    report(f"smoke: version {stable} has no record of these photos: captioning them through the stack")
    port = stack.read_state()["port"]
    served = checks.caption_over_http(f"http://127.0.0.1:{port}", folder, headers=stack.client_headers())
    captions = {image: answer.get("caption") or "" for image, answer in served.items()}
    return checks.score_captions(captions, recorded["references"])[checks.METRIC]


# --------------------------------------------------------------------------- shadow


def shadow(version: str, settings, report: Callable[[str], None] = print) -> Verdict:
    """The API copies `release.shadow.share` percent of its requests to the candidate's model
    server (haproxy's shadow frontend) and discards its answers; the copies' errors and agreement
    with the stable captions decide, then the candidate's own error and caption failure rates."""
    from captioning.release.analysis import ShadowLimits, wait_for_shadow_verdict

    plan = current(version)
    release, folder, stage = settings.release, stack.stack_dir(), "shadow"
    slot = plan["candidate"]["model"][0]
    haproxy.set_state(folder, "shadow", slot, "ready")
    try:
        _wait_up("shadow", slot)
        prometheus = Prometheus(stack.prometheus_url(stack.read_state()["port"]))
        timeout = release.prometheus_timeout_seconds
        verdict = by_hand(stage) or _down(plan, stage)
        if verdict is None:
            limits = ShadowLimits.from_release(release)
            verdict = _going_on(wait_for_shadow_verdict(prometheus, version, limits, stage, timeout, report=report))
        if not verdict.failed and requested() is None:
            # Errors only: copies are sent after the stable answer, a few at a time, so their
            # latency says little; the canary judges latency on real traffic.
            limits = replace(Limits.shadow(release), max_latency_ratio=math.inf, max_p95_seconds=math.inf)
            verdict = _down(plan, stage) or _analysis(plan, limits, stage, timeout, report)
    finally:
        haproxy.set_state(folder, "shadow", slot, "maint")
    report(verdict.reason)
    return record(plan, verdict)


def _wait_up(backend: str, slot: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stack.server_stats()[(backend, f"s{slot}")]["status"].startswith("UP"):
            return
        time.sleep(0.5)
    raise stack.StackError(f"the candidate's s{slot} did not come UP in haproxy's {backend} backend")


def _going_on(verdict: Verdict) -> Verdict:
    """An inconclusive analysis lets the rollout go on, saying so."""
    if verdict.outcome != INCONCLUSIVE:
        return verdict
    return replace(verdict, reason=f"{verdict.reason}: too little traffic to judge, going on")


# --------------------------------------------------------------------------- canary


def canary(version: str, settings, report: Callable[[str], None] = print) -> Verdict:
    """Each step of `release.canary.steps` gives the candidate that share of the model traffic
    through haproxy's weights, then an analysis against the stable version decides."""
    plan = current(version)
    release = settings.release
    limits = Limits.canary(release)
    verdict = Verdict(PASSED, stage="canary", reason="canary: no step")
    for share in release.canary.steps:
        stage = f"canary {share}%"
        verdict = by_hand(stage)
        if verdict is not None:
            return record(plan, replace(verdict, stage="canary"))
        servers = candidate_servers(share, stack.read_state()["replicas"])
        with stack.locked():
            _add_candidate_servers(plan, servers)
        set_share(plan, share)
        report(f"{stage}: the candidate gets {share}% of the model traffic on {servers} model server(s)")
        timeout = release.prometheus_timeout_seconds
        verdict = _down(plan, stage) or _analysis(plan, step_limits(share, limits), stage, timeout, report)
        verdict = _down(plan, stage) or verdict
        record(plan, verdict)
        if verdict.failed:
            return replace(verdict, stage="canary")
    return replace(verdict, stage="canary")


def _settle(plan: dict, stage: str, seconds: float) -> Verdict | None:
    """Let traffic flow for `seconds`; a verdict already when a person decided or the candidate died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        verdict = by_hand(stage) or _down(plan, stage)
        if verdict is not None:
            return verdict
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return None


def _down(plan: dict, stage: str) -> Verdict | None:
    """A failed verdict when a candidate model server is not UP in haproxy (it died, or stopped
    answering its health checks): its figures would otherwise just stop coming."""
    stats = stack.server_stats()
    for slot in plan["candidate"]["model"]:
        status = stats[("model", f"s{slot}")]["status"]
        if not status.startswith("UP"):
            reason = f"{stage}: the candidate's model server s{slot} is {status} in haproxy"
            return Verdict(FAILED, stage=stage, reason=reason, check="replica down")
    return None


def candidate_servers(share: float, replicas: int) -> int:
    """The candidate's model servers at a canary share: enough that none carries more requests
    than a stable one (each of the `replicas` stable servers carries (100 - share) / replicas
    percent), so that the analysis compares latencies under the same load per server, as Argo
    Rollouts scales a canary with its weight; every replica at 100 %."""
    if share >= 100:
        return replicas
    return max(1, min(replicas, math.ceil(share * replicas / (100 - share) - 1e-9)))


def step_limits(share: float, limits: Limits) -> Limits:
    """A canary step's limits: above 50 % the candidate's servers (at most as many as the stable
    version has) each carry more requests than a stable one, so its latency is judged by the p95
    ceiling alone, not against the stable version's."""
    return limits if share <= 50 else replace(limits, max_latency_ratio=math.inf)


def _add_candidate_servers(plan: dict, count: int) -> None:
    """Start candidate model servers (no traffic until their weight is set) until it has `count`;
    the caller holds the stack's lock."""
    while len(plan["candidate"]["model"]) < count:
        state = stack.read_state()
        taken = _taken(state, "model")
        slot = stack.add_replica(state["port"], "model", plan["image"], taken, plan["version"], 0, plan["env"])
        plan["candidate"]["model"].append(slot)
        _save(plan)


def set_share(plan: dict, share: float) -> None:
    """The candidate's model slots get `share` percent of the model traffic, the stable slots the rest."""
    state = stack.read_state()
    candidate, stable = haproxy.shares(share, len(state["slots"]["model"]), len(plan["candidate"]["model"]))
    for slot in plan["candidate"]["model"]:
        haproxy.set_weight(stack.stack_dir(), "model", slot, candidate)
    for slot in state["slots"]["model"]:
        haproxy.set_weight(stack.stack_dir(), "model", slot, stable)


def _analysis(plan: dict, limits: Limits, stage: str, timeout: float, report) -> Verdict:
    """The analysis of a stage over a window that begins with it: it waits one window first, so
    that no figure of an earlier stage (shadow copies, a smaller share) is judged as this one's."""
    settled = _settle(plan, stage, limits.window_seconds)
    if settled is not None:
        return settled
    state = stack.read_state()
    prometheus = Prometheus(stack.prometheus_url(state["port"]))
    verdict = wait_for_verdict(
        prometheus, plan["version"], plan["stable"]["version"] or None, limits, stage, timeout, report=report
    )
    verdict = _going_on(verdict)
    report(verdict.reason)
    return verdict


# --------------------------------------------------------------------------- promote


def promote(version: str, settings, report: Callable[[str], None] = print) -> dict:
    """Every replica on the candidate: its model servers up to the stack's replicas, the stable
    ones drained and stopped but one kept warm (weight 0) for `release.keep_previous_seconds`,
    then the API."""
    plan = current(version)
    with stack.locked():
        state = stack.read_state()
        _add_candidate_servers(plan, state["replicas"])
        state = stack.read_state()
        for slot in plan["candidate"]["model"]:
            haproxy.set_weight(stack.stack_dir(), "model", slot, haproxy.FULL_WEIGHT)
        stable_slots = list(state["slots"]["model"])
        warm = stable_slots[0] if settings.release.keep_previous_seconds > 0 and stable_slots else None
        for slot in stable_slots:
            if slot == warm:
                haproxy.set_weight(stack.stack_dir(), "model", slot, 0)
            else:
                stack.remove_replica("model", slot)
        state = stack.read_state()
        state["slots"]["model"] = list(plan["candidate"]["model"])
        if warm is not None:
            until = time.time() + settings.release.keep_previous_seconds
            state["previous"] = {**plan["stable"], "slot": warm, "until": until}
        state.update(rollout=None, image=plan["image"], version=plan["version"])
        stack.write_state(state)
        _roll_api(state, plan["image"], plan["version"])
        report(f"promote: version {plan['version']} serves every request (version {plan['stable']['version']} warm)")
        return _finish(plan, "promoted")


def _roll_api(state: dict, image: str, version: str) -> None:
    port = state["port"]
    for old in list(state["slots"]["api"]):
        new = stack.add_replica(port, "api", image, set(state["slots"]["api"]), version)
        state["slots"]["api"].append(new)
        stack.write_state(state)
        stack.remove_replica("api", old)
        state["slots"]["api"].remove(old)
        stack.write_state(state)


def _finish(plan: dict, outcome: str) -> dict:
    clear_control()
    state = stack.read_state()
    state["rollout"] = None
    state["last_rollout"] = {**plan, "outcome": outcome, "finished_at": time.time()}
    state["last_rollout"]["seconds"] = round(state["last_rollout"]["finished_at"] - plan["started_at"], 1)
    stack.write_state(state)
    return state


# --------------------------------------------------------------------------- rollback


def rollback(version: str, verdict: Verdict, tracking: str | None, name: str) -> dict:
    """The candidate gets weight 0 at once, is drained and stopped; the stable slots get their
    full weight back; the registry's champion returns to the stable version and the candidate is
    tagged with why (the watcher never releases it again by itself)."""
    from captioning.registry.refusals import refuse

    plan = current(version)
    if not plan["verdicts"] or plan["verdicts"][-1]["reason"] != verdict.reason:
        record(plan, verdict)  # a stage that broke rather than judged
    folder = stack.stack_dir()
    state = stack.read_state()
    for slot in plan["candidate"]["model"]:
        haproxy.set_weight(folder, "model", slot, 0)
        haproxy.set_state(folder, "shadow", slot, "maint")
    for slot in state["slots"]["model"]:
        haproxy.set_weight(folder, "model", slot, haproxy.FULL_WEIGHT)
    for slot in list(plan["candidate"]["model"]):
        stack.remove_replica("model", slot)
    for slot in list(plan["candidate"]["api"]):
        pods.stop("api", slot)
    aliases = refuse(
        tracking,
        name,
        plan["version"],
        plan["stable"]["version"] or None,
        verdict.reason,
        verdict.stage,
        verdict.figure,
        verdict.threshold,
    )
    plan["refusal"] = {"reason": verdict.reason, "aliases": aliases}
    return _finish(plan, "rolled back")


# --------------------------------------------------------------------------- the previous version


def drop_previous(state: dict | None = None, force: bool = True) -> None:
    """Stop the warm previous version's model server (when its time is up, or `force`)."""
    state = state if state is not None else stack.read_state()
    previous = (state or {}).get("previous")
    if not previous or (not force and time.time() < previous["until"]):
        return
    stack.remove_replica("model", previous["slot"])
    state["previous"] = None
    stack.write_state(state)


def return_to_previous(report: Callable[[str], None] = print) -> dict:
    """Back to the warm previous version in seconds: its model server takes all the traffic at
    once, a second one starts, the current ones are drained and stopped, then the API follows."""
    with stack.locked():
        state = stack.read_state()
        previous = state.get("previous")
        if not previous:
            raise RolloutError("no previous version is kept warm")
        folder = stack.stack_dir()
        haproxy.set_weight(folder, "model", previous["slot"], haproxy.FULL_WEIGHT)
        for slot in state["slots"]["model"]:
            haproxy.set_weight(folder, "model", slot, 0)
        report(f"version {previous['version']} serves the model traffic again")
        current = list(state["slots"]["model"])
        slots = [previous["slot"]]
        while len(slots) < state["replicas"]:
            taken = set(current) | set(slots)
            slots.append(stack.add_replica(state["port"], "model", previous["image"], taken, previous["version"]))
        for slot in current:
            stack.remove_replica("model", slot)
        state.update(previous=None, image=previous["image"], version=previous["version"])
        state["slots"]["model"] = slots
        stack.write_state(state)
        _roll_api(state, previous["image"], previous["version"])
        return state
