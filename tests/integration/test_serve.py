"""The sampling endpoint on a real local Ray Serve (127.0.0.1, a free port) with a tiny registered model.

Serve is started once for the module; the rollout test moves the registry alias (a real MLflow registry) and the
last test shuts Serve down.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration

MAX_SAMPLES = 4
T = 100
MAX_COST = 400  # serve.max_request_cost
QUEUE_COST = 800  # serve.max_queue_cost: ten 4-image 20-step requests
RELOAD_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """Register an untrained tiny class-conditional UNet, deploy it, yield (url, DeployResult)."""
    import mlflow

    from pipelines.config import load_config
    from pipelines.model_io import diffusion_card, log_and_register
    from pipelines.serve import deploy_and_check, shutdown
    from pipelines.tracking import setup_mlflow

    ws = tmp_path_factory.mktemp("serve_ws")
    cfg = load_config(None, [
        f"workspace.root={ws}", "registry.model_name=serve-tiny", "diffusion.diffusion_steps=100",
        f"serve.port={free_port()}", "serve.max_batch_size=16", f"serve.reload_interval_s={RELOAD_S}",
        "serve.max_ongoing_requests=64", "serve.max_queued_requests=64", f"serve.max_samples_per_request={MAX_SAMPLES}",
        f"serve.max_request_cost={MAX_COST}", f"serve.max_queue_cost={QUEUE_COST}",
    ])
    exp_id = setup_mlflow(cfg)
    run = mlflow.start_run(experiment_id=exp_id, run_name="serve-test")
    mlflow.end_run()
    card = {"unet": tiny_unet(0).config, "diffusion": diffusion_card(cfg.diffusion),
            "data": {"image_size": 8, "channels": 1, "num_classes": 10, "class_names": [str(i) for i in range(10)]},
            "training": {"steps": 0, "run_id": run.info.run_id}}
    log_and_register(tiny_unet(0).state_dict(), card, run_id=run.info.run_id, model_name="serve-tiny",
                     alias="champion")
    result = deploy_and_check(cfg)
    yield result.url, result, (card, run.info.run_id)
    shutdown()


def tiny_unet(seed: int):
    import torch

    from diffusion_core.models import UNet

    torch.manual_seed(seed)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=10, image_size=8, norm_groups=8)
    with torch.no_grad():  # an untrained UNet's zero output layer would give every seed the same images
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


def post(url, body, **kw):
    return requests.post(f"{url}/v1/generate", json=body, timeout=120, **kw)


def post_many(url, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(url, b), bodies))


def test_build_app_from_serve_run_args_and_env(monkeypatch):
    from ray.serve import Application

    import pipelines.serve as ps
    from pipelines.config import ConfigError

    # a request larger than the batch bound is spread over several forwards: no cross-check any more
    app = ps.build_app({"model_uri": "models:/x/1", "set": "serve.max_batch_size=4;serve.max_samples_per_request=32"})
    assert isinstance(app, Application)
    monkeypatch.setenv(ps.ENV_OVERRIDES, "serve.max_batch_size=0")
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        ps.app  # noqa: B018 - the lazily built module attribute used by `serve run pipelines.serve:app`


def test_deploy_reports_the_model(served):
    url, result, _ = served
    assert url.startswith("http://127.0.0.1:")
    assert result.model.name == "serve-tiny" and result.model.version == "1"
    assert result.smoke_test["images"] == 1


def test_client_writes_pngs_and_grids(served, tmp_path):
    from pipelines import client
    from pipelines.serve import app_running

    url = served[0]
    assert app_running() and client.healthy(url) and client.model_info(url)["num_classes"] == 10
    images = client.generate(url, out_dir=tmp_path, num_samples=2, steps=3, seed=5)
    assert [im.size for im in images] == [(8, 8)] * 2 and len(list(tmp_path.glob("sample_5_*.png"))) == 2
    grid = client.generate_grid(url, tmp_path / "grid.png", num_samples=MAX_SAMPLES + 2, steps=3, seed=5)
    assert Image.open(grid).size == (32, 22)  # 6 tiles: 3 per row, 2 rows
    events = [name for name, _ in client.stream(url, num_samples=1, steps=4, preview_every=2, seed=1)]
    assert events == ["start", "preview", "final"]
    with pytest.raises(client.EndpointError, match="num_samples"):
        client.generate(url, num_samples=MAX_SAMPLES + 1)


def test_healthz_and_model_info(served):
    url = served[0]
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["loop_alive"] and health["model_loaded"] and health["version"] == "1"
    assert health["queued_cost"] >= 0 and health["max_queue_cost"] == QUEUE_COST
    before = health["stats"]
    assert requests.post(f"{url}/v1/generate", json={"num_samples": 2, "steps": 3, "seed": 0}, timeout=120).ok
    after = requests.get(f"{url}/healthz", timeout=30).json()["stats"]
    assert after["forwards"] - before["forwards"] >= 3 and after["rows"] - before["rows"] >= 6  # the loop's split
    assert after["step_s"] >= after["forward_s"] > before["forward_s"]
    info = requests.get(f"{url}/v1/model", timeout=30).json()
    assert info["name"] == "serve-tiny" and info["version"] == "1" and info["run_id"]
    assert (info["image_size"], info["channels"], info["num_classes"]) == (8, 1, 10)
    assert info["num_timesteps"] == T and info["training_steps"] == 0 and info["max_request_cost"] == MAX_COST
    # serve.pack_ratio auto resolves per device (4 on CPU); pack_rows is calibrated at load, one of the buckets
    assert info["pack_ratio"] == 4.0 and info["pack_rows"] in (1, 2, 4, 8, 16)
    assert (health["pack_ratio"], health["pack_rows"]) == (info["pack_ratio"], info["pack_rows"])
    assert info["fast"]["device_type"] == "cpu" and info["fast"]["channels_last"] is True
    assert "/v1/generate" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]


def test_valid_request_returns_pngs(served):
    url = served[0]
    r = post(url, {"num_samples": 3, "steps": 5, "seed": 7, "class_labels": [1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3 and all(decode(s).shape == (8, 8) for s in body["images"])
    assert body["seed"] == 7 and body["sampler"] == "ddim" and body["steps"] == 5 and body["batch_size"] >= 3
    assert body["model"]["uri"] == "models:/serve-tiny@champion" and body["model"]["version"] == "1"
    assert set(body["timings_ms"]) == {"queue", "sample", "encode", "total"}
    grid = post(url, {"num_samples": 3, "steps": 5, "seed": 7}, headers={"Accept": "image/png"})
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(grid.content)).size == (22, 22)  # 2x2 tiles of 8 px + 2 px padding
    assert post(url, {"num_samples": 1, "steps": 2}).json()["seed"] >= 0  # random seed returned


def test_concurrent_requests_share_batched_runs(served):
    url = served[0]
    rs = post_many(url, [{"num_samples": 2, "steps": 10, "seed": i} for i in range(8)])
    assert [r.status_code for r in rs] == [200] * 8
    sizes = [r.json()["batch_size"] for r in rs]
    runs = sum(2 / b for b in sizes)  # a run of b images served b/2 of these requests
    assert max(sizes) > 2 and runs < 8, sizes


def test_same_seed_alone_or_batched_gives_the_same_images(served):
    url = served[0]
    req = {"num_samples": 2, "steps": 10, "seed": 1234, "class_labels": [3], "sampler": "ddpm"}
    alone = post(url, req).json()
    for _ in range(3):  # retry if the scheduler happened not to batch it
        rs = post_many(url, [{**req, "seed": 1}, req, {**req, "seed": 2, "class_labels": [5, 6]},
                             {**req, "seed": 3}])
        batched = rs[1].json()
        if batched["batch_size"] > 2:
            break
    assert batched["batch_size"] > 2
    for a, b in zip(alone["images"], batched["images"], strict=True):
        assert np.abs(decode(a).astype(int) - decode(b).astype(int)).max() <= 1


BAD = [
    ({"num_samples": MAX_SAMPLES + 1}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": "many"}, "num_samples"),
    ({"num_samples": 1.5}, "num_samples"),
    ({"sampler": "euler"}, "sampler"),
    ({"steps": T + 1}, "steps"),
    ({"steps": 0}, "steps"),
    ({"eta": -0.1}, "eta"),
    ({"sampler": "dpm_solver", "eta": 0.5}, "eta"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"class_labels": [10]}, "class_labels"),
    ({"class_labels": [-1]}, "class_labels"),
    ({"class_labels": "3"}, "class_labels"),
    ({"num_samples": 2, "class_labels": [1, 2, 3]}, "class_labels"),
    ({"seed": "x"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"bogus": 1}, "bogus"),
    # strict: no JSON coercion
    ({"num_samples": True}, "num_samples"),
    ({"num_samples": "2"}, "num_samples"),
    ({"steps": 2.0}, "steps"),
    ({"seed": "0"}, "seed"),
    ({"class_labels": [True]}, "class_labels"),
    ({"guidance_scale": True}, "guidance_scale"),
    ({"preview_every": 1}, "preview_every"),  # a stream field on /v1/generate
    # cost: 4 x 60 x 2 (guided) = 480 > serve.max_request_cost
    ({"num_samples": 4, "steps": 60, "guidance_scale": 2.0}, "steps"),
    ({"num_samples": 4, "steps": 60, "guidance_scale": 2.0}, "num_samples"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}:{json.dumps(b)}" for b, f in BAD])
def test_bad_input_is_422_naming_the_field(served, body, field):
    url = served[0]
    r = post(url, {"num_samples": 1, "steps": 2, **body})
    assert r.status_code == 422, r.text
    assert any(field in [str(p) for p in e["loc"]] for e in r.json()["detail"]), r.text


def test_malformed_and_oversized_bodies_then_replica_still_answers(served):
    url = served[0]
    r = requests.post(f"{url}/v1/generate", data="{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 422
    r = post(url, {"num_samples": 1, "padding": "x" * 100_000})
    assert r.status_code == 422 and "body" in r.text
    r = requests.post(f"{url}/v1/generate/stream", json={"num_samples": 1, "steps": T + 5}, timeout=30)
    assert r.status_code == 422 and "steps" in r.text
    ok = post(url, {"num_samples": 1, "steps": 2, "seed": 3})
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def sse_events(response):
    events, name, data = [], "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def test_stream_yields_previews_then_final(served):
    url = served[0]
    req = {"num_samples": 2, "steps": 8, "seed": 11, "preview_every": 2}
    with requests.post(f"{url}/v1/generate/stream", json=req, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "final" and names.count("preview") == 3, names
    assert [d["step"] for n, d in events if n == "preview"] == [2, 4, 6]
    final = events[-1][1]
    assert final["seed"] == 11 and len(final["images"]) == 2
    plain = post(url, {k: v for k, v in req.items() if k != "preview_every"}).json()
    for a, b in zip(plain["images"], final["images"], strict=True):
        assert np.abs(decode(a).astype(int) - decode(b).astype(int)).max() <= 1


def test_overload_gets_503_quickly_and_recovers(served):
    url = served[0]

    def timed(body):
        t = time.perf_counter()
        r = post(url, body)
        return r.status_code, time.perf_counter() - t

    with ThreadPoolExecutor(40) as pool:
        out = list(pool.map(timed, [{"num_samples": MAX_SAMPLES, "steps": 20, "seed": i} for i in range(40)]))
    codes = [c for c, _ in out]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 8, codes
    slowest_200 = max(t for c, t in out if c == 200)
    assert all(t < slowest_200 for c, t in out if c == 503), out
    r = post(url, {"num_samples": MAX_SAMPLES, "steps": 20})
    assert r.status_code == 200
    assert requests.get(f"{url}/healthz", timeout=30).json()["queued_cost"] == 0


def _refused_once(url):
    """A 503 of a full queue carries Retry-After."""
    with ThreadPoolExecutor(16) as pool:
        rs = list(pool.map(lambda i: post(url, {"num_samples": MAX_SAMPLES, "steps": 50, "seed": i}), range(16)))
    return [r for r in rs if r.status_code == 503]


def test_a_full_queue_answers_503_with_retry_after(served):
    refused = _refused_once(served[0])
    assert refused and all(r.headers.get("Retry-After") for r in refused)
    assert "queue full" in refused[0].json()["detail"]


def _wait_for(predicate, what: str, timeout_s: float = 120.0, every_s: float = 0.2):
    """Poll until ``predicate()`` holds (bounded: fails with ``what`` after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out waiting for {what}")


def _health(url):
    return requests.get(f"{url}/healthz", timeout=30).json()


def test_disconnected_clients_are_cancelled_and_free_their_rows(served):
    """Two clients give up on 4-image 100-step DDPM requests (together a full queue), then a stream of one is
    closed after its first preview: the engine drops each (counted as cancelled), the queue drains, and a 2-step
    request answers."""
    url = served[0]
    before = _health(url)["cancelled"]
    body = {"num_samples": MAX_SAMPLES, "steps": T, "sampler": "ddpm", "seed": 1}

    def give_up(seed):
        try:
            requests.post(f"{url}/v1/generate", json={**body, "seed": seed}, timeout=0.3)
        except requests.Timeout:
            return True
        return False

    with ThreadPoolExecutor(2) as pool:  # 8 rows x 100 steps together: far longer than 0.3 s
        assert all(pool.map(give_up, range(2)))
    _wait_for(lambda: _health(url)["cancelled"] >= before + 2, "2 cancellations")
    _wait_for(lambda: _health(url)["queued_cost"] == 0, "an empty queue")
    with requests.post(f"{url}/v1/generate/stream", json={**body, "preview_every": 1}, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines(decode_unicode=True)
        _wait_for(lambda: next(lines).startswith("event: preview"), "a first preview", every_s=0)
        # 99 steps to go: closing the stream now is a disconnect mid-run
    _wait_for(lambda: _health(url)["cancelled"] >= before + 3, "the stream's cancellation")
    _wait_for(lambda: _health(url)["queued_cost"] == 0, "an empty queue")
    assert post(url, {"num_samples": 1, "steps": 2}).status_code == 200


def _register(card, run_id, state_dict, alias=None):
    from pipelines.model_io import log_and_register

    return log_and_register(state_dict, card, run_id=run_id, model_name="serve-tiny", alias=alias)


def test_rollout_follows_the_alias_without_failing_requests(served):
    """Move @champion to a version registered by hand (same artifacts, no project tags): the replica swaps it in
    between steps while requests keep succeeding; a version that fails to load leaves the new one serving."""
    import mlflow

    url, _, (card, run_id) = served
    req = {"num_samples": 2, "steps": 10, "seed": 3, "class_labels": [4]}
    v1_images = post(url, req).json()["images"]
    _register(card, run_id, tiny_unet(1).state_dict())  # version 2, no alias yet
    stop, codes, versions = False, [], []

    def load():
        while not stop:
            r = post(url, {"num_samples": 1, "steps": 5, "seed": len(codes)})
            codes.append(r.status_code)
            if r.status_code == 200:
                versions.append(r.json()["model"]["version"])

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(load) for _ in range(4)]
        _wait_for(lambda: len(codes) >= 8, "requests before the move")
        mlflow.MlflowClient().set_registered_model_alias("serve-tiny", "champion", "2")
        _wait_for(lambda: requests.get(f"{url}/v1/model", timeout=30).json()["version"] == "2",
                  "version 2 served", timeout_s=RELOAD_S + 60)
        _wait_for(lambda: versions.count("2") >= 8, "requests on version 2")
        stop = True
        for f in futures:
            f.result()
    assert set(codes) == {200}, codes
    assert versions[0] == "1" and versions[-1] == "2" and set(versions) == {"1", "2"}
    v2 = post(url, req).json()
    assert v2["model"]["version"] == "2" and v2["images"] != v1_images

    # a broken version: the weights do not fit the card's UNet
    broken = {k: v[..., :1] if v.ndim else v for k, v in tiny_unet(2).state_dict().items()}
    _register(card, run_id, broken, alias="champion")  # version 3
    _wait_for(lambda: "3" in _health(url)["failed_versions"], "version 3 refused", timeout_s=RELOAD_S + 60)
    assert requests.get(f"{url}/v1/model", timeout=30).json()["version"] == "2"
    assert post(url, req).json()["images"] == v2["images"]

    # the promote stage's immediate reload: the replica checks the alias at once and answers what it serves
    from pipelines.serve import trigger_reload

    _register(card, run_id, tiny_unet(0).state_dict(), alias="champion")  # version 4 = version 1's weights
    assert trigger_reload() == ["4"]
    v4 = post(url, req).json()
    assert v4["model"]["version"] == "4" and v4["images"] == v1_images


def test_clean_shutdown(served):
    from pipelines.serve import app_running, shutdown

    url = served[0]
    shutdown()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
    assert not app_running()
