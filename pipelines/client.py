"""Tiny client of the sampling endpoint (``diffusion-pipeline sample --url ...``)."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from PIL import Image


class EndpointError(RuntimeError):
    """A non-200 answer; ``status`` and the server's ``detail`` are kept."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


def _check(r: requests.Response) -> requests.Response:
    if r.status_code != 200:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise EndpointError(r.status_code, detail)
    return r


def decode(images_b64: list[str]) -> list[Image.Image]:
    """Base64 PNG strings -> PIL images."""
    return [Image.open(io.BytesIO(base64.b64decode(s))) for s in images_b64]


def save(images: list[Image.Image], out_dir: str | Path, prefix: str = "sample") -> list[Path]:
    """Write ``out_dir/<prefix>_<i>.png``; returns the paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = d / f"{prefix}_{i:03d}.png"
        im.save(p)
        paths.append(p)
    return paths


def generate_raw(url: str, *, timeout: float = 300.0, retries: int = 3, **params: Any) -> dict[str, Any]:
    """POST ``/v1/generate`` and return the JSON answer (``images`` base64, ``seed``, ``batch_size``, ``model``
    with the version that made them, ...). A 503 with ``Retry-After`` (queue full, model loading) is retried up
    to ``retries`` times after the advised wait."""
    for attempt in range(retries + 1):
        r = requests.post(f"{url.rstrip('/')}/v1/generate", json=params, timeout=timeout)
        if r.status_code != 503 or attempt == retries or "Retry-After" not in r.headers:
            return _check(r).json()
        time.sleep(min(30.0, float(r.headers["Retry-After"])))
    raise AssertionError("unreachable")


def generate(url: str, *, out_dir: str | Path | None = None, timeout: float = 300.0,
             **params: Any) -> list[Image.Image]:
    """Sample images from the endpoint at ``url`` (fields as in ``GenerateRequest``); writes PNGs to ``out_dir``
    when given (``sample_<seed>_<i>.png``)."""
    answer = generate_raw(url, timeout=timeout, **params)
    images = decode(answer["images"])
    if out_dir is not None:
        save(images, out_dir, prefix=f"sample_{answer['seed']}")
    return images


def generate_grid(url: str, out: str | Path, *, num_samples: int = 16, seed: int | None = None,
                  timeout: float = 600.0, **params: Any) -> Path:
    """Sample ``num_samples`` images and write one PNG grid to ``out``.

    More images than the server's ``max_samples_per_request`` are fetched in several requests with seeds
    ``seed, seed + 1, ...`` (so up to that limit the grid equals a single request with ``seed``).
    """
    import numpy as np
    import torch

    from pipelines.images import from_png_b64, from_uint8, make_grid

    limit = int(model_info(url)["max_samples_per_request"])
    images: list[np.ndarray] = []
    chunk = 0
    while len(images) < num_samples:
        n = min(limit, num_samples - len(images))
        s = None if seed is None else seed + chunk
        answer = generate_raw(url, timeout=timeout, num_samples=n, seed=s, **params)
        images += [from_png_b64(b) for b in answer["images"]]
        chunk += 1
    batch = np.stack([a if a.ndim == 3 else a[..., None] for a in images])  # [B, H, W, C]
    x = from_uint8(torch.from_numpy(batch).permute(0, 3, 1, 2))
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    make_grid(x).save(p)
    return p


def stream(url: str, *, timeout: float = 300.0, **params: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """POST ``/v1/generate/stream`` and yield ``(event, data)`` pairs (start, preview..., final)."""
    with requests.post(f"{url.rstrip('/')}/v1/generate/stream", json=params, stream=True, timeout=timeout) as r:
        _check(r)
        event, data = "message", []
        for line in r.iter_lines(decode_unicode=True):
            if line == "":
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def model_info(url: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """``GET /v1/model``."""
    return _check(requests.get(f"{url.rstrip('/')}/v1/model", timeout=timeout)).json()


def healthy(url: str, *, timeout: float = 5.0) -> bool:
    """True when ``GET /healthz`` answers 200."""
    try:
        return requests.get(f"{url.rstrip('/')}/healthz", timeout=timeout).status_code == 200
    except requests.RequestException:
        return False
