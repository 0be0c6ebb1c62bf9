"""The playground page's HTML (pipelines.playground) without a browser: self-contained, config injected safely."""

from __future__ import annotations

import json
import re

import pytest

from pipelines.playground import ENV_MLFLOW_UI, LOCAL_MLFLOW_UI, mlflow_ui_url, render_page


def test_page_is_self_contained():
    html = render_page("http://127.0.0.1:5000")
    assert "{{" not in html and html.count("<script") == 2 and "<link" not in html
    # Nothing loaded from elsewhere: no src/href to another host, no import, no CDN (works offline).
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert not re.search(r"\bimport\s*\(|\bfrom\s+['\"]https?:", html)
    assert 'data-state="loading"' in html and 'id="generate"' in html


def test_config_cannot_close_its_script_element():
    html = render_page("http://x/</script><script>alert(1)</script>")
    block = re.search(r'<script id="playground-config" type="application/json">(.*?)</script>', html, re.S)
    assert json.loads(block.group(1)) == {"mlflow_ui_url": "http://x/</script><script>alert(1)</script>"}
    assert "alert(1)</script>" not in html


@pytest.mark.parametrize("tracking_uri,expected", [
    ("http://mlflow:5000/", "http://mlflow:5000"),
    ("https://mlflow.example/", "https://mlflow.example"),
    ("sqlite:///workspace/mlflow.db", LOCAL_MLFLOW_UI),
    ("/abs/mlruns", LOCAL_MLFLOW_UI),
    (None, LOCAL_MLFLOW_UI),
    ("databricks", None),
])
def test_mlflow_ui_url(monkeypatch, tracking_uri, expected):
    monkeypatch.delenv(ENV_MLFLOW_UI, raising=False)
    assert mlflow_ui_url(tracking_uri) == expected
    monkeypatch.setenv(ENV_MLFLOW_UI, "http://ui.local:8080/")
    assert mlflow_ui_url(tracking_uri) == "http://ui.local:8080"
