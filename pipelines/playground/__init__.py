"""The endpoint's playground page (``GET /``): one HTML page with its CSS and JavaScript inlined.

The assets are plain files next to this module (``index.html``, ``style.css``, ``app.js``): no build step, no CDN,
nothing fetched but the endpoint's own ``v1/model`` and ``v1/generate/stream``. The page's URL contract:

- query parameters prefill the form: ``class_labels`` (``3`` or ``1,2,3``), ``sampler``, ``steps``,
  ``guidance_scale``, ``num_samples``, ``seed``; ``autorun=1`` starts a generation on load;
- the request body carries JSON numbers (the API does not coerce strings);
- ``<body data-state>`` is ``loading`` -> ``idle`` -> ``running`` -> ``done`` (final images shown, each an
  ``<img>`` with a ``data:image/png`` source) or ``error`` (the message shown in ``#status``; a 422 lists
  ``field: message`` per error).
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib.resources import files

ENV_MLFLOW_UI = "DIFFUSION_PIPELINE_MLFLOW_UI"
# What `mlflow ui` listens on by default: the UI of a local (SQLite / file) tracking store.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


@cache
def _asset(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def mlflow_ui_url(tracking_uri: str | None) -> str | None:
    """Where a browser finds the MLflow UI for ``tracking_uri``.

    ``$DIFFUSION_PIPELINE_MLFLOW_UI`` when set; an ``http(s)`` tracking server serves the UI itself; a local store
    (``sqlite:``, a path) is shown by ``mlflow ui``, on ``http://127.0.0.1:5000`` by default; None for others.
    """
    if os.environ.get(ENV_MLFLOW_UI):
        return os.environ[ENV_MLFLOW_UI].rstrip("/")
    uri = tracking_uri or ""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if uri.startswith(("sqlite:", "file:", "/", ".")) or uri == "":
        return LOCAL_MLFLOW_UI
    return None  # e.g. "databricks": no URL we can know


def render_page(mlflow_ui: str | None = None) -> str:
    """The playground HTML; ``mlflow_ui`` (see :func:`mlflow_ui_url`) is the base of its MLflow links."""
    # "<" escaped so that no value can close the <script> element it sits in.
    config = json.dumps({"mlflow_ui_url": mlflow_ui}).replace("<", "\\u003c")
    return (_asset("index.html").replace("{{style}}", _asset("style.css"))
            .replace("{{config}}", config).replace("{{script}}", _asset("app.js")))
