"""Screenshots for the README, taken in headless Chromium (Debian's /usr/bin/chromium through playwright).

Needs what it photographs to be running: an endpoint (``diffusion-pipeline serve`` or the quickstart's deploy
stage) and/or ``mlflow ui`` on the workspace's tracking store. Writes PNGs into ``docs/img/``:

- ``playground.png``: the endpoint's ``GET /`` after one generation (``autorun=1``);
- ``mlflow_run.png``: the training run of the served (or named) model version;
- ``mlflow_model.png``: that registered model version.

Example (after ``make quickstart``)::

    .venv/bin/mlflow ui --backend-store-uri sqlite:///workspace/mlflow.db --port 5000 &
    .venv/bin/diffusion-pipeline serve --config configs/quickstart.yaml &
    .venv/bin/python docs/screenshots.py --endpoint http://127.0.0.1:8000 --mlflow-ui http://127.0.0.1:5000 \\
        --tracking-uri sqlite:///workspace/mlflow.db

Without ``--mlflow-ui`` only the playground is taken; without ``--endpoint`` only the MLflow pages (then name the
model with ``--model models:/<name>@champion``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

import requests

OUT = Path(__file__).resolve().parent / "img"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 300_000
SETTLE_MS = 3_000


def playground(page, endpoint: str, query: dict[str, object], out: Path) -> Path:
    """Open the playground with ``autorun=1``, wait for the final images (``data-state="done"``), shoot."""
    page.goto(f"{endpoint.rstrip('/')}/?{urlencode({**query, 'autorun': 1})}")
    page.wait_for_selector('body[data-state="done"], body[data-state="error"]', timeout=WAIT_MS)
    if page.evaluate("document.body.dataset.state") != "done":
        raise RuntimeError(f"the playground reported an error: {page.inner_text('#status')}")
    path = out / "playground.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def model_version(tracking_uri: str | None, model: str | None, endpoint: str | None) -> dict[str, str]:
    """name, version, run id and experiment id of ``model`` (a models:/ URI), else of what ``endpoint`` serves."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    if model:
        name, _, ref = model.removeprefix("models:/").partition("@")
        mv = client.get_model_version_by_alias(name, ref) if ref else client.get_model_version(*name.split("/"))
    else:
        info = requests.get(f"{endpoint.rstrip('/')}/v1/model", timeout=30).json()
        mv = client.get_model_version(info["name"], info["version"])
    run = client.get_run(mv.run_id)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "experiment_id": run.info.experiment_id, "run_name": run.info.run_name or mv.run_id}


# MLflow 3.17's UI opens an "MLflow Assistant" side panel over a third of the page on first load; these are the
# browser-storage flags it keeps once a user has closed it (unknown keys are ignored by other versions).
HIDE_ASSISTANT = ("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                  "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")


def mlflow_pages(page, ui: str, mv: dict[str, str], out: Path) -> list[Path]:
    """The run page and the model-version page of the MLflow UI (a single-page app: wait for its content)."""
    ui = ui.rstrip("/")
    shots = [
        ("mlflow_run.png", f"{ui}/#/experiments/{mv['experiment_id']}/runs/{mv['run_id']}", mv["run_name"]),
        ("mlflow_model.png", f"{ui}/#/models/{quote(mv['name'])}/versions/{mv['version']}",
         f"Version {mv['version']}"),
    ]
    paths = []
    for name, url, text in shots:
        page.goto(url, wait_until="load")
        try:  # the UI keeps polling (never "network idle"): wait for the page's own text instead
            page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
        except Exception:  # the layout changed between MLflow versions: shoot what is there
            print(f"note: {text!r} not found on {url}", file=sys.stderr)
        page.wait_for_timeout(SETTLE_MS)  # let charts and lazy panels draw
        paths.append(out / name)
        page.screenshot(path=str(paths[-1]), full_page=False)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", help="endpoint base URL, e.g. http://127.0.0.1:8000 (playground screenshot)")
    p.add_argument("--mlflow-ui", help="MLflow UI base URL, e.g. http://127.0.0.1:5000 (run and model pages)")
    p.add_argument("--tracking-uri", help="where to look the model version up (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--model", help="models:/<name>@<alias> or models:/<name>/<version> "
                                   "(default: what --endpoint serves)")
    p.add_argument("--query", default="num_samples=16&steps=50&seed=0&sampler=ddim",
                   help="playground form values as a URL query (default: %(default)s)")
    p.add_argument("--out", type=Path, default=OUT, help="output folder (default: docs/img)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    if not args.endpoint and not args.mlflow_ui:
        p.error("give --endpoint and/or --mlflow-ui")
    if args.mlflow_ui and not (args.model or args.endpoint):
        p.error("--mlflow-ui needs --model or --endpoint to know which model version to show")

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    query = dict(kv.split("=", 1) for kv in args.query.split("&") if kv)
    taken = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": args.width, "height": args.height}, device_scale_factor=1)
        context.add_init_script(HIDE_ASSISTANT)
        page = context.new_page()
        if args.endpoint:
            taken.append(playground(page, args.endpoint, query, args.out))
        if args.mlflow_ui:
            mv = model_version(args.tracking_uri, args.model, args.endpoint)
            taken += mlflow_pages(page, args.mlflow_ui, mv, args.out)
        browser.close()
    for path in taken:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
