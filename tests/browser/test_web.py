"""The web page in headless Chromium: upload, caption, attention heat map, feedback."""

from __future__ import annotations

import requests

from harness.serving import synthetic_jpeg


def upload(page, name: str, data: bytes, mime: str = "image/jpeg") -> None:
    page.set_input_files("#file-input", files=[{"name": name, "mimeType": mime, "buffer": data}])


def test_upload_caption_attention_and_feedback(caption_service, page):
    from captioning.data.feedback import Review, load_feedback

    image = synthetic_jpeg(seed=21)
    expected = requests.post(
        caption_service.url + "/caption",
        files={"image": ("s.jpg", image, "image/jpeg")},
        data={"beam_size": 3, "max_length": 20},
        timeout=60,
    ).json()

    page.goto(caption_service.url + "/")
    assert page.title() == "Image captioning"
    assert page.locator("label[for=file-input]").count() == 1
    upload(page, "scene.jpg", image)

    page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
    assert page.text_content("#caption") == expected["caption"]
    assert page.locator("#alternatives li").count() == len(expected["alternatives"])
    assert "log p" in page.text_content("#alternatives li")

    # Attention: one button per word, a heat map drawn over the image.
    words = page.locator("#words button")
    assert words.count() >= 1
    page.wait_for_function("document.getElementById('heatmap').dataset.drawn === 'true'", timeout=10_000)
    painted = page.evaluate("""() => {
        const c = document.getElementById('heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n; }""")
    assert painted > 0
    last = words.count() - 1
    words.nth(last).hover()
    assert words.nth(last).get_attribute("aria-pressed") == "true"
    assert page.get_attribute("#heatmap", "data-word") == str(last)
    if words.count() > 1:  # keyboard: the arrow keys step through the words
        words.nth(0).focus()
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#heatmap", "data-word") == "1"

    # Correction box -> POST /feedback -> stored in the database.
    page.fill("#correction", "a corrected caption typed in the browser")
    page.click("#send-feedback")
    page.wait_for_function("document.getElementById('status').textContent.includes('saved')", timeout=15_000)
    captions = [
        c
        for r in load_feedback(caption_service.data_dir / "feedback", review=Review("none")).records
        for c in r.captions
    ]
    assert "a corrected caption typed in the browser" in captions


def test_errors_are_shown_not_swallowed(caption_service, page):
    page.goto(caption_service.url + "/")
    upload(page, "notes.txt", b"plain text", mime="text/plain")
    assert "not an image" in page.text_content("#status")
    upload(page, "cut.jpg", synthetic_jpeg(seed=2)[:600])
    page.wait_for_function("document.getElementById('status').textContent.includes('Could not')", timeout=15_000)
    assert "truncated" in page.text_content("#status")
    assert page.get_attribute("#status", "aria-live") == "polite"


def test_phone_layout_fits_the_screen(caption_service, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(caption_service.url + "/")
        upload(page, "scene.jpg", synthetic_jpeg(seed=4))
        page.wait_for_function("document.getElementById('caption').textContent.length > 0", timeout=30_000)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        assert page.get_attribute("#file-input", "capture") == "environment"
        assert page.get_attribute("#file-input", "accept") == "image/*"
    finally:
        context.close()
