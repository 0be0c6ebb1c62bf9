"""The playground page (``GET /``) in a real headless Chromium against a real Ray Serve endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from tests.browser.conftest import CLASS_NAMES, MAX_SAMPLES, MODEL_NAME, T

pytestmark = [pytest.mark.browser, pytest.mark.integration]

WAIT_MS = 180_000  # a hang guard, not a timing assertion


def decode_data_url(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))))


def watch(page, origin: str):
    """Record the page's generate bodies, and refuse (and record) any request leaving the endpoint."""
    bodies, foreign = [], []

    def route(r):
        if r.request.url.startswith(origin):
            if r.request.method == "POST":
                bodies.append(json.loads(r.request.post_data))
            return r.continue_()
        foreign.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    return bodies, foreign


def wait_state(page, *states: str) -> str:
    selector = ", ".join(f'body[data-state="{s}"]' for s in states)
    page.wait_for_selector(selector, timeout=WAIT_MS)
    return page.evaluate("document.body.dataset.state")


def test_autorun_streams_previews_then_shows_the_final_images(endpoint, page):
    bodies, foreign = watch(page, endpoint)
    page.goto(f"{endpoint}/?class_labels=3&sampler=ddpm&steps=6&guidance_scale=2&num_samples=3&seed=7&autorun=1")
    assert wait_state(page, "done", "error") == "done", page.inner_text("#status")

    # The page sent JSON numbers, exactly the URL's values, and nothing left the endpoint's origin (works offline).
    assert bodies == [{"sampler": "ddpm", "class_labels": [3], "steps": 6, "guidance_scale": 2, "num_samples": 3,
                       "seed": 7}]
    assert all(type(bodies[0][k]) is int for k in ("steps", "num_samples", "seed"))
    assert foreign == []

    finals = [decode_data_url(s) for s in page.eval_on_selector_all("#result img", "els => els.map(e => e.src)")]
    previews = page.eval_on_selector_all("#preview img", "els => els.map(e => e.src)")
    assert len(finals) == 3 and len(previews) == 3 and all(a.shape == (8, 8) for a in finals)
    assert all(decode_data_url(s).shape == (8, 8) for s in previews)
    # Oracle: the same request through the JSON API gives the same pictures (same seed, batch-independent).
    api = requests.post(f"{endpoint}/v1/generate", json=bodies[0], timeout=120).json()
    for shown, ref in zip(finals, api["images"], strict=True):
        ref_px = np.asarray(Image.open(io.BytesIO(base64.b64decode(ref))))
        assert np.abs(shown.astype(int) - ref_px.astype(int)).max() <= 1

    meta = page.inner_text("#result-meta")
    assert "seed 7" in meta and f"{MODEL_NAME} v1" in meta and "ddpm, 6 steps" in meta
    assert page.get_attribute("#result img", "alt") == f"sample 1: {CLASS_NAMES[3]}"
    assert "seed=7" in page.evaluate("location.search") and "autorun" not in page.evaluate("location.search")
    assert page.get_attribute("#docs-link", "href") == "docs"
    assert page.get_attribute("#mlflow-link", "href").endswith(f"/#/models/{MODEL_NAME}/versions/1")


def test_form_lists_classes_by_name_and_the_served_limits(endpoint, page):
    page.goto(f"{endpoint}/")
    assert wait_state(page, "idle", "error") == "idle", page.inner_text("#status")
    labels = page.eval_on_selector_all("#class_labels option", "els => els.map(e => [e.value, e.textContent])")
    assert labels[1:] == [[str(k), name] for k, name in enumerate(CLASS_NAMES)]
    samplers = page.eval_on_selector_all("#sampler option", "els => els.map(e => e.value)")
    assert samplers == requests.get(f"{endpoint}/v1/model", timeout=30).json()["samplers"]
    assert page.get_attribute("#steps", "max") == str(T)
    assert page.get_attribute("#num_samples", "max") == str(MAX_SAMPLES)


def test_bad_value_shows_the_422_message_then_a_good_one_runs(endpoint, page):
    bodies, _ = watch(page, endpoint)
    page.goto(f"{endpoint}/?num_samples=1&seed=1")
    assert wait_state(page, "idle", "error") == "idle", page.inner_text("#status")
    page.fill("#steps", str(T + 1))
    page.click("#generate")
    assert wait_state(page, "error", "done") == "error"
    status = page.inner_text("#status")
    assert status.startswith("HTTP 422") and f"steps: steps must lie in [1, {T}]" in status, status
    assert bodies[-1]["steps"] == T + 1 and page.locator("#result img").count() == 0

    page.fill("#steps", "3")
    page.click("#generate")
    assert wait_state(page, "done", "error") == "done", page.inner_text("#status")
    assert page.locator("#result img").count() == 1 and page.inner_text("#status").startswith("done")


@pytest.mark.parametrize("query,field", [(f"steps=2&num_samples={MAX_SAMPLES + 1}", "num_samples"),
                                         ("steps=2&class_labels=10", "class_labels"),
                                         ("steps=2.5", "steps")])
def test_server_side_rejections_name_the_field(endpoint, page, query, field):
    page.goto(f"{endpoint}/?{query}&autorun=1")
    assert wait_state(page, "error", "done") == "error"
    status = page.inner_text("#status")
    assert status.startswith("HTTP 422") and f"{field}: " in status, status


def test_a_url_value_that_is_not_a_number_is_an_error_before_any_request(endpoint, page):
    bodies, _ = watch(page, endpoint)
    page.goto(f"{endpoint}/?seed=abc&autorun=1")
    assert wait_state(page, "error", "done") == "error"
    assert page.inner_text("#status") == 'seed: not a number: "abc"' and bodies == []
