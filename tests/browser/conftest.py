"""Browser fixtures: Debian's Chromium (never a downloaded browser build) driven by playwright, and a real Ray
Serve endpoint on 127.0.0.1 serving a tiny registered model (untrained: the tests check the page, not the art)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Headless and quiet: no GPU, no QUIC, no first-run, update, sync or background traffic.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
T = 100
NUM_CLASSES = 10
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MAX_SAMPLES = 4
MODEL_NAME = "browser-tiny"

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_chromium(playwright):
    """Debian's /usr/bin/chromium headless (``make test`` installs it when missing)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install -y chromium)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def chromium(endpoint):
    """Chromium, started after the endpoint: playwright's sync API runs an event loop in this thread, and Serve's
    synchronous handle calls (deploy) refuse to run inside one."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    yield page
    context.close()


def register_tiny_model(cfg, run_name: str = "browser-test"):
    """An untrained 8x8 grey class-conditional UNet registered as ``cfg.registry.model_name`` @champion."""
    import mlflow
    import torch

    from diffusion_core.models import UNet
    from pipelines.model_io import diffusion_card, log_and_register
    from pipelines.tracking import setup_mlflow

    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=NUM_CLASSES, image_size=8, norm_groups=8)
    exp_id = setup_mlflow(cfg)
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name)
    mlflow.end_run()
    card = {"unet": unet.config, "diffusion": diffusion_card(cfg.diffusion),
            "data": {"image_size": 8, "channels": 1, "num_classes": NUM_CLASSES, "class_names": CLASS_NAMES},
            "training": {"steps": 0, "run_id": run.info.run_id}}
    return log_and_register(unet.state_dict(), card, run_id=run.info.run_id, model_name=cfg.registry.model_name,
                            alias=cfg.registry.champion_alias)


@pytest.fixture(scope="module")
def endpoint(ray_session, tmp_path_factory):
    """A deployed endpoint (URL) serving the tiny model; Serve is shut down afterwards."""
    from pipelines.config import load_config
    from pipelines.serve import deploy_and_check, shutdown

    ws = tmp_path_factory.mktemp("browser_ws")
    cfg = load_config(None, [
        f"workspace.root={ws}", f"registry.model_name={MODEL_NAME}", f"diffusion.diffusion_steps={T}",
        f"serve.port={free_port()}", "serve.max_batch_size=8", f"serve.max_samples_per_request={MAX_SAMPLES}",
    ])
    register_tiny_model(cfg)
    result = deploy_and_check(cfg)
    yield result.url
    shutdown()
