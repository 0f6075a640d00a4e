"""The browser tests drive the same shared service as the integration tests."""

from __future__ import annotations

import shutil

import pytest

from harness import serving

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="session")
def caption_service(tmp_path_factory, request):
    request.addfinalizer(serving.stop_all)
    model = serving.tiny_package(tmp_path_factory.mktemp("tiny-model"))
    return serving.shared_service(
        "default", model, tmp_path_factory.mktemp("service"), {"CAPTIONING_RELOAD_TOKEN": "test-reload-token"}
    )


@pytest.fixture(scope="module")
def browser():
    """Closed after the browser tests: a live sync Playwright keeps an asyncio loop running in
    this thread, which would turn later synchronous Prefect calls into coroutines."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    yield page
    context.close()
