"""Shadow copies with real servers: the service (`bentoml serve`, API and model service) copies
every caption request to a second model server (`python -m bento serve model`) holding another
model, the candidate. Clients get exactly what the service without shadowing answers; the API's
/metrics count the copies and the agreement under the candidate's version; with the candidate
stopped, clients are still answered and the failed copies are counted."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from captioning.serving.agreement import agreement
from captioning.serving.shadow import candidate_client
from harness import serving

IMAGES = [serving.synthetic_jpeg(seed=seed) for seed in (11, 12, 13, 14)]


@pytest.fixture(scope="module")
def candidate_model(tmp_path_factory):
    """Another tiny model: trained for one epoch, so its weights (and version) differ."""
    from harness.trained import train_tiny_model

    return train_tiny_model(tmp_path_factory.mktemp("candidate-model"), epochs=1)


@pytest.fixture(scope="module")
def shadow(candidate_model, tmp_path_factory):
    server = serving.start_model_server(candidate_model, tmp_path_factory.mktemp("shadow-model"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shadowed(tiny_model, shadow, tmp_path_factory):
    environ = {"CAPTIONING_SHADOW_URL": shadow.url, "CAPTIONING_SHADOW_SHARE": "100"}
    server = serving.start_service(tiny_model, tmp_path_factory.mktemp("shadowed"), environ)
    yield server
    server.stop()


def send_all(server, request_id: str = "") -> list[dict]:
    """Each image to /caption, then three of them to /caption_batch: the answers, latency aside."""
    answers = []
    for n, image in enumerate(IMAGES):
        headers = {"X-Request-ID": f"{request_id}-{n}"} if request_id else {}
        files = {"image": ("scene.jpg", image, "image/jpeg")}
        answers.append(requests.post(server.url + "/caption", files=files, headers=headers, timeout=60))
    files = [("image", (f"scene{n}.jpg", image, "image/jpeg")) for n, image in enumerate(IMAGES[:3])]
    answers.append(requests.post(server.url + "/caption_batch", files=files, data={"beam_size": "2"}, timeout=60))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return [{k: v for k, v in answer.json().items() if k != "latency_ms"} for answer in answers]


def samples(server, name: str) -> dict[tuple, float]:
    """The samples of one series on the server's /metrics, by their labels."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def wait_for(condition, what: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def candidate_version(shadow) -> str:
    return requests.post(shadow.url + "/info", json={}, timeout=30).json()["model_version"]


def candidate_captions(shadow, images: list[bytes], **options) -> list[str]:
    """The candidate's captions of `images`, asked as the API asks it (candidate_client)."""
    import service

    service.CaptionAPI.inject_config()  # the services' settings, as a BentoML server has them

    async def ask() -> list[dict]:
        client = candidate_client(shadow.url, service.CaptionModelService).to_async
        try:
            return await client.call("caption", [service.CaptionJob(image=image, **options) for image in images])
        finally:
            await client.close()

    return [result["caption"] for result in asyncio.run(ask())]


def test_clients_get_the_stable_answers_while_the_candidate_is_compared(caption_service, shadowed, shadow):
    tag = f"shadow-{uuid.uuid4().hex[:8]}"
    answers = send_all(shadowed, tag)
    assert answers == send_all(caption_service)  # as without shadowing
    candidate = candidate_version(shadow)
    stable = requests.get(shadowed.url + "/model", timeout=10).json()["model_version"]
    assert candidate != stable and candidate.startswith("local-")

    ok = (("candidate", candidate), ("outcome", "ok"))
    wait_for(lambda: samples(shadowed, "captioning_shadow_requests_total").get(ok) == 5, "5 copies answered")
    counted = samples(shadowed, "captioning_shadow_requests_total")
    assert set(counted) == {ok}, counted  # no error, nothing dropped, one candidate
    compared = samples(shadowed, "captioning_shadow_agreement_count")
    assert compared == {(("candidate", candidate),): 7.0}  # one per image: 4 alone, 3 in the batch
    # The agreement is that of the candidate's captions of the same images with the served ones.
    served = [answer["caption"] for answer in answers[:4]] + [r["caption"] for r in answers[4]["results"]]
    theirs = candidate_captions(shadow, IMAGES) + candidate_captions(shadow, IMAGES[:3], beam_size=2)
    expected = sum(agreement(candidate_caption, caption) for candidate_caption, caption in zip(theirs, served))
    total = samples(shadowed, "captioning_shadow_agreement_sum")[(("candidate", candidate),)]
    assert total == pytest.approx(expected, abs=1e-6) and 0 <= total <= 700
    assert theirs != served  # another model: the comparison is not of a caption with itself

    # The candidate captioned the same images, under the same request ids, and counted them.
    captions = samples(shadow, "captioning_model_captions_total")
    assert sum(captions.values()) == 7 + 7  # the API's copies, then this test's own questions
    lines = [json.loads(text) for text in shadow.log_path.read_text().splitlines() if text.startswith("{")]
    seen = {line["request_id"] for line in lines if line["service"] == "model" and line["route"] == "/caption"}
    assert {f"{tag}-{n}" for n in range(len(IMAGES))} <= seen
    assert {line["model_version"] for line in lines} == {candidate}


def test_a_stopped_candidate_changes_no_answer_and_its_copies_count_as_errors(caption_service, shadowed, shadow):
    candidate = candidate_version(shadow)
    shadow.stop()
    assert send_all(shadowed) == send_all(caption_service)
    failed = (("candidate", candidate), ("outcome", "error"))
    assert wait_for(lambda: samples(shadowed, "captioning_shadow_requests_total").get(failed), "failed copies") == 5
    assert requests.get(shadowed.url + "/readyz", timeout=10).status_code == 200
