"""The sampling engine alone (no Ray, no HTTP), driven by hand with ``Engine.step()`` or in its thread.

Oracle: ``DiffusionSampler.sample(seed=...)``, i.e. the core loops with one generator per request.
"""

from __future__ import annotations

import time

import pytest
import torch

from diffusion_core.models import UNet
from pipelines.config import DiffusionConfig
from pipelines.engine import (
    Cancelled,
    Engine,
    LoopStats,
    NotReady,
    Overloaded,
    SampleSpec,
    TimedOut,
    TooCostly,
    _time_forwards,
    batch_buckets,
    calibrate_pack_rows,
    request_cost,
    time_forward,
)
from pipelines.model_io import DiffusionSampler, diffusion_card

T = 100
TOL = 1e-4  # the bound for batch independence (CPU fp32)


def tiny_sampler(seed: int = 0, version: str = "1", learn_sigma: bool = True) -> DiffusionSampler:
    torch.manual_seed(seed)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=10, image_size=8, norm_groups=8, learn_sigma=learn_sigma)
    with torch.no_grad():  # an untrained UNet's zero output layer would make every image the same
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = DiffusionConfig(diffusion_steps=T, noise_schedule="cosine", learn_sigma=learn_sigma)
    card = {"unet": unet.config, "diffusion": diffusion_card(diffusion),
            "data": {"image_size": 8, "channels": 1, "num_classes": 10}}
    return DiffusionSampler(unet=unet, card=card, info={"name": "tiny", "version": version})


@pytest.fixture(scope="module")
def model():
    return tiny_sampler()


def engine_with(model, **kw) -> Engine:
    e = Engine(**kw)
    e.swap(model, model.info["version"])
    return e


def drain(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        engine.step()
        if not engine._active and not engine._inbox:
            return
    raise AssertionError("engine did not finish")


def oracle(model, spec: SampleSpec) -> torch.Tensor:
    return model.sample(spec.num_samples, sampler=spec.sampler, steps=spec.steps, eta=spec.eta,
                        guidance_scale=spec.guidance_scale, class_labels=spec.class_labels, seed=spec.seed)


SPECS = [
    SampleSpec(num_samples=2, seed=1, sampler="ddpm", steps=6, class_labels=[3]),
    SampleSpec(num_samples=3, seed=2, sampler="ddim", steps=5, eta=0.5),
    SampleSpec(num_samples=1, seed=3, sampler="dpm_solver", steps=7, class_labels=[9]),
    SampleSpec(num_samples=2, seed=4, sampler="ddim", steps=4, guidance_scale=3.0, class_labels=[1, 2]),
    SampleSpec(num_samples=5, seed=5, sampler="dpm_solver", steps=3, guidance_scale=2.0),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.sampler}{s.steps}-g{s.guidance_scale}")
def test_a_lone_request_reproduces_the_core_loop(model, spec):
    e = engine_with(model, max_batch_size=16)
    ticket = e.submit(spec)
    drain(e)
    result = ticket.result(0)
    assert result.images.shape == (spec.num_samples, 1, 8, 8) and result.version == "1"
    assert (result.images - oracle(model, spec)).abs().max().item() < TOL


@pytest.mark.parametrize("bound", [1, 4, 64])
def test_results_do_not_depend_on_batch_mates_or_the_bound(model, bound):
    """All SPECS at once, with rows split over forwards (bound 1 / 4) or all in one (64): each equals the oracle."""
    e = engine_with(model, max_batch_size=bound)
    tickets = [e.submit(s) for s in SPECS]
    drain(e)
    for spec, t in zip(SPECS, tickets, strict=True):
        assert (t.result(0).images - oracle(model, spec)).abs().max().item() < TOL, spec
    assert max(t.result(0).batch_size for t in tickets) <= bound


def test_rows_of_all_requests_share_one_forward_per_step(model):
    e = engine_with(model, max_batch_size=16)
    tickets = [e.submit(SampleSpec(num_samples=2, seed=i, steps=10)) for i in range(3)]
    drain(e)
    assert e.forwards == 10 and e.rows == 60
    assert [t.result(0).batch_size for t in tickets] == [6, 6, 6]


def test_guided_rows_count_twice_and_a_large_request_spreads_over_forwards(model):
    e = engine_with(model, max_batch_size=4)
    t = e.submit(SampleSpec(num_samples=3, seed=0, steps=2, guidance_scale=2.0, class_labels=[4]))
    drain(e)
    assert e.rows == 2 * 3 * 2 and e.forwards == 4  # 6 forward rows per step over a bound of 4: 2 forwards
    assert t.result(0).batch_size == 4


def test_unbatched_bound_one_runs_one_row_per_forward(model):
    e = engine_with(model, max_batch_size=1)
    e.submit(SampleSpec(num_samples=3, seed=0, steps=2))
    drain(e)
    assert e.forwards == 6 and e.rows == 6


def test_cancel_frees_rows_at_the_next_boundary(model):
    e = engine_with(model, max_batch_size=16)
    long = e.submit(SampleSpec(num_samples=4, seed=0, sampler="ddpm", steps=T))
    for _ in range(3):
        e.step()
    assert e.health()["queued_cost"] == 4 * (T - 3)
    long.cancel()
    short = e.submit(SampleSpec(num_samples=1, seed=1, steps=2))
    drain(e)
    with pytest.raises(Cancelled):
        long.result(0)
    assert short.result(0).images.shape[0] == 1
    assert e.forwards == 3 + 2 and e.health()["queued_cost"] == 0


def test_a_request_past_its_deadline_times_out(model):
    e = engine_with(model, request_timeout_s=1e-9)
    t = e.submit(SampleSpec(num_samples=1, seed=0, steps=5))
    drain(e)
    with pytest.raises(TimedOut):
        t.result(0)
    assert e.forwards == 0 and e.health()["queued_cost"] == 0


def test_cost_admission_refuses_costly_requests_and_a_full_queue(model):
    assert request_cost(4, 10, True) == 80 and SampleSpec(num_samples=4, seed=0, steps=10).cost == 40
    e = engine_with(model, max_request_cost=40, max_queue_cost=100)
    with pytest.raises(TooCostly, match="max_request_cost=40"):
        e.submit(SampleSpec(num_samples=3, seed=0, steps=7, guidance_scale=2.0))
    a = e.submit(SampleSpec(num_samples=4, seed=0, steps=10))
    e.submit(SampleSpec(num_samples=4, seed=0, steps=10))
    with pytest.raises(Overloaded, match="queue full"):
        e.submit(SampleSpec(num_samples=4, seed=0, steps=10))
    drain(e)
    assert a.result(0) is not None and e.health()["queued_cost"] == 0
    e.submit(SampleSpec(num_samples=4, seed=0, steps=10))  # room again


def test_short_requests_overtake_long_ones_and_long_ones_are_not_starved(model):
    """Bound 4: a 4-row 100-step request fills every forward; a 1-row 2-step request admitted later finishes
    within 2 forwards; with a stream of short requests the long one still advances every starve_after + 1."""
    e = engine_with(model, max_batch_size=4, starve_after=3)
    long = e.submit(SampleSpec(num_samples=4, seed=0, sampler="ddpm", steps=T))
    e.step()
    short = e.submit(SampleSpec(num_samples=1, seed=1, steps=2))
    e.step()
    e.step()
    assert short.future.done() and not long.future.done()
    for i in range(12):  # a new 4-row short request at every boundary would take every forward
        e.submit(SampleSpec(num_samples=4, seed=10 + i, steps=1))
        e.step()
    req = next(r for r in e._active if r.ticket is long)
    assert req.pos >= 1 + 12 // 4, req.pos
    drain(e)
    assert (long.result(0).images - oracle(model, long.spec)).abs().max().item() < TOL


def test_pack_ratio_runs_short_requests_in_their_own_forwards(model):
    """Fill (default): a 1-row 2-step request shares both forwards with a 3-row 50-step one. pack_ratio=4: the
    short one runs alone (forwards of 1 row) while the long one waits, and joins again once it is starved."""
    for ratio, rows_with_short in ((None, [4, 4]), (4.0, [1, 1])):
        e = engine_with(model, max_batch_size=16, pack_ratio=ratio, pack_rows=1, starve_after=3)
        long = e.submit(SampleSpec(num_samples=3, seed=0, steps=50))
        e.step()
        short = e.submit(SampleSpec(num_samples=1, seed=1, steps=2))
        sizes = []
        while not short.future.done():
            before = e.rows
            e.step()
            sizes.append(e.rows - before)
        assert sizes == rows_with_short and short.result(0).batch_size == max(rows_with_short)
        drain(e)
        assert (long.result(0).images - oracle(model, long.spec)).abs().max().item() < TOL


# Requests of one sampler whose rows sit at different points of the grouped update: eta 0 beside eta > 0 (zero
# noise rows), a DDPM request at its last step beside ones that still draw noise, DPM-Solver++ rows at first order
# (just admitted), second order and the final step, a guided request beside unguided ones.
GROUPED = [
    SampleSpec(num_samples=2, seed=11, sampler="ddim", steps=3, eta=0.0),
    SampleSpec(num_samples=1, seed=12, sampler="ddim", steps=5, eta=1.0, class_labels=[4]),
    SampleSpec(num_samples=3, seed=13, sampler="ddim", steps=4, eta=0.3, guidance_scale=2.5),
    SampleSpec(num_samples=1, seed=14, sampler="ddpm", steps=2),
    SampleSpec(num_samples=2, seed=15, sampler="ddpm", steps=5, class_labels=[7]),
    SampleSpec(num_samples=1, seed=16, sampler="dpm_solver", steps=2),
    SampleSpec(num_samples=2, seed=17, sampler="dpm_solver", steps=6, guidance_scale=1.5),
]


@pytest.mark.parametrize("late", [0, 2])
def test_one_vectorised_update_per_sampler_matches_each_core_loop(model, late):
    """All GROUPED requests share forwards and, per sampler, one step-function call (some admitted ``late``
    steps after the others, so their rows are at other steps/orders): each equals its own core loop."""
    e = engine_with(model, max_batch_size=64)
    calls = []
    update = e._update
    e._update = lambda group: calls.append(len(group)) or update(group)
    tickets = [e.submit(s) for s in GROUPED[::2]]
    for _ in range(late):
        e.step()
    tickets += [e.submit(s) for s in GROUPED[1::2]]
    drain(e)
    for t in tickets:
        alone = engine_with(model, max_batch_size=64)
        single = alone.submit(t.spec)
        drain(alone)  # the per-request path: every update a group of one
        assert (t.result(0).images - single.result(0).images).abs().max().item() < TOL, t.spec
        assert (t.result(0).images - oracle(model, t.spec)).abs().max().item() < TOL, t.spec
    assert max(calls) >= 3  # requests were updated together, not one by one


def packed(e: Engine) -> dict[int, int]:
    """seed -> rows of the next forward, without running it."""
    e._boundary()
    _, chunks = e._pack()
    return {req.spec.seed: k for req, _, k in chunks}


def test_pack_rows_caps_long_requests_beside_short_ones_and_fills_when_they_are_gone(model):
    """pack_ratio 4, pack_rows 4: with 2 short rows active, a forward has the 2 short rows plus 2 long rows (the
    long ones with least remaining work, then by arrival); once the short ones are done all 6 long rows run."""
    e = engine_with(model, max_batch_size=16, pack_ratio=4.0, pack_rows=4, starve_after=100)
    longs = [e.submit(SampleSpec(num_samples=1, seed=i, sampler="ddpm", steps=50)) for i in range(6)]
    e.step()  # the long ones alone: all similar, none is long, the forward is full
    assert e.rows == 6
    for seed in (100, 101):
        e.submit(SampleSpec(num_samples=1, seed=seed, steps=2))
    assert packed(e) == {100: 1, 101: 1, 0: 1, 1: 1}
    e.step()
    assert packed(e) == {100: 1, 101: 1, 0: 1, 1: 1}  # seeds 0, 1 are now the long ones with least remaining
    e.step()
    assert packed(e) == {i: 1 for i in range(6)}  # the short ones are done
    drain(e)
    for t in longs:
        assert (t.result(0).images - oracle(model, t.spec)).abs().max().item() < TOL


def test_pack_rows_one_keeps_long_requests_out_until_they_are_starved(model):
    e = engine_with(model, max_batch_size=16, pack_ratio=4.0, pack_rows=1, starve_after=2)
    e.submit(SampleSpec(num_samples=2, seed=0, sampler="ddpm", steps=50))
    e.step()
    e.submit(SampleSpec(num_samples=1, seed=1, steps=20))
    assert packed(e) == {1: 1}
    e.step()
    e.step()
    assert packed(e) == {0: 2, 1: 1}  # left out of 2 forwards: starved, it joins whatever the class


def test_calibrate_pack_rows_takes_the_largest_forward_within_its_budget():
    assert calibrate_pack_rows({1: 9.1, 2: 10.6, 4: 13.4, 8: 19.3, 16: 31.0}) == 8  # quickstart, 1 CPU thread
    assert calibrate_pack_rows({1: 1.0, 2: 1.0, 4: 1.1, 8: 1.2, 16: 1.3}) == 16  # a GPU: fill
    assert calibrate_pack_rows({1: 5.0, 2: 13.0, 4: 9.0}) == 1  # stops at the first size over the budget
    assert calibrate_pack_rows({1: 5.0, 2: 9.0, 4: 12.0}, factor=3.0) == 4


def test_time_forward_warms_up_once_then_takes_the_median_of_its_repeats():
    calls, delays = [], iter([0.0, 0.03, 0.001, 0.01])  # warm-up (untimed), then 30, 1, 10 ms

    def forward(x, t, y=None):
        calls.append((x.shape[0], t.shape[0], None if y is None else int(y[0])))
        time.sleep(next(delays, 0.0))

    x, t = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    wall, cpu = time_forward(forward, x, t, {"y": torch.full((2,), 7)}, repeats=3)
    assert calls == [(2, 2, 7)] * 4
    assert 0.009 <= wall < 0.03 and cpu < wall  # the median of the timed calls; sleeping costs no CPU
    assert time_forward(forward, x, t, repeats=0) == (0.0, 0.0)  # warm-up only
    calls.clear()
    assert time_forward(forward, x, t, repeats=1, warmup=False)[0] > 0 and len(calls) == 1  # timed, no warm-up


def test_calibration_times_the_sizes_in_interleaved_rounds(model):
    slot = Engine().prepare(model)
    seen, inner = [], slot.forward
    slot.forward = lambda x, t, **kw: (seen.append(x.shape[0]), inner(x, t, **kw))[1]
    costs = _time_forwards(slot, [1, 2, 4], rounds=3)
    assert seen == [1, 2, 4] + [1, 2, 4] * 3  # one warm-up per size, then one timed forward per size and round
    assert sorted(costs) == [1, 2, 4] and all(v > 0 for v in costs.values())


def test_prepare_calibrates_pack_rows_only_when_packing_by_size_without_a_fixed_cap(model):
    assert Engine(pack_ratio=4.0).prepare(model).pack_rows in batch_buckets(16)
    assert Engine(pack_ratio=4.0, pack_rows=3).prepare(model).pack_rows is None  # the engine's own cap applies
    assert Engine().prepare(model).pack_rows is None
    e = engine_with(model, max_batch_size=16, pack_ratio=4.0)
    e.step()
    assert e.health()["pack_rows"] in batch_buckets(16)


def test_uniform_requests_at_any_progress_are_all_packed(model):
    """The long class is by request size, not progress: 1-image 10-step requests admitted at different steps
    (remaining work 1 vs 10) all share every forward, even with pack_rows 1."""
    e = engine_with(model, max_batch_size=16, pack_ratio=2.0, pack_rows=1)
    for i in range(4):
        e.submit(SampleSpec(num_samples=1, seed=i, steps=10))
        e.step()
    assert packed(e) == {i: 1 for i in range(4)}


def test_a_short_request_is_not_held_back_by_the_cap(model):
    """A short request larger than pack_rows still fills the forward up to max_batch_size."""
    e = engine_with(model, max_batch_size=8, pack_ratio=4.0, pack_rows=2)
    e.submit(SampleSpec(num_samples=4, seed=0, sampler="ddpm", steps=60))
    e.step()
    e.submit(SampleSpec(num_samples=6, seed=1, steps=2))
    assert packed(e) == {1: 6}


def test_swap_between_steps_keeps_in_flight_requests_on_their_version(model):
    v2 = tiny_sampler(seed=1, version="2")
    e = engine_with(model, max_batch_size=16)
    spec = SampleSpec(num_samples=2, seed=7, sampler="dpm_solver", steps=6, class_labels=[2])
    old = e.submit(spec)
    e.step()
    e.step()
    e.swap(v2, "2")
    new = e.submit(spec)
    assert e.version == "2"
    drain(e)
    assert old.result(0).version == "1" and new.result(0).version == "2"
    assert (old.result(0).images - oracle(model, spec)).abs().max().item() < TOL
    assert (new.result(0).images - oracle(v2, spec)).abs().max().item() < TOL
    assert (old.result(0).images - new.result(0).images).abs().max().item() > 1e-3


def test_previews_come_every_k_steps_but_not_at_the_end(model):
    events = []
    e = engine_with(model)
    t = e.submit(SampleSpec(num_samples=2, seed=0, steps=7, preview_every=3), on_event=events.append)
    drain(e)
    assert [ev["step"] for ev in events] == [3, 6] and all(ev["total"] == 7 for ev in events)
    assert events[0]["images"].shape == (2, 1, 8, 8) and t.result(0).images.shape == (2, 1, 8, 8)


def test_model_faults_fail_only_their_requests_and_the_loop_goes_on(model):
    e = engine_with(model)
    bad = e.submit(SampleSpec(num_samples=1, seed=0, steps=2, class_labels=[99]))  # labels_for refuses it
    good = e.submit(SampleSpec(num_samples=1, seed=0, steps=2))
    drain(e)
    with pytest.raises(Exception, match="class_labels"):
        bad.result(0)
    assert good.result(0).images.shape[0] == 1


def test_threaded_loop_not_ready_health_and_stop(model):
    e = Engine()
    with pytest.raises(NotReady, match="no model"):
        e.submit(SampleSpec(num_samples=1, seed=0))
    e.start()
    e.swap(model, "1")
    assert e.health()["loop_alive"] and e.health()["model_loaded"]
    tickets = [e.submit(SampleSpec(num_samples=1, seed=i, steps=3)) for i in range(4)]
    assert all(t.result(timeout=120).images.shape[0] == 1 for t in tickets)
    e.stop()
    assert not e.health()["loop_alive"]
    with pytest.raises(NotReady, match="not running"):
        e.submit(SampleSpec(num_samples=1, seed=0))


def test_loop_stats_count_rows_and_split_forward_from_overhead(model):
    e = engine_with(model, max_batch_size=4)
    before = e.stats.snapshot()
    e.submit(SampleSpec(num_samples=3, seed=0, steps=2, guidance_scale=2.0, class_labels=[1]))
    drain(e)
    after = e.stats.snapshot()
    assert (after["forwards"], after["rows"]) == (4, 12) == (e.forwards, e.rows)  # 6 rows per step, bound 4
    assert after["step_s"] >= after["forward_s"] > 0 and after["step_cpu_s"] >= after["forward_cpu_s"] > 0
    period = LoopStats.period(before, after, seconds=after["step_s"])
    assert period["forwards"] == 4 and period["mean_rows"] == 3.0 and period["busy"] == pytest.approx(1.0, abs=0.01)
    assert period["overhead_ms"] >= 0 and period["step_gil_ms"] >= 0


def test_batch_buckets():
    assert batch_buckets(1) == [1] and batch_buckets(16) == [1, 2, 4, 8, 16] and batch_buckets(24)[-2:] == [16, 24]


# ---------------------------------------------------------------------------------- the request schema
def test_check_request_names_each_field_including_the_cost():
    from pipelines.serve_schemas import GenerateRequest, check_request

    def fields(max_cost=None, **kw):
        errs = check_request(GenerateRequest(**kw), max_samples=4, num_timesteps=100, num_classes=10,
                             max_cost=max_cost)
        return [e["loc"][-1] for e in errs]

    assert fields(num_samples=4, steps=100) == []
    assert fields(num_samples=5) == ["num_samples"]
    assert fields(num_samples=1, steps=101) == ["steps"]
    assert fields(num_samples=1, sampler="dpm_solver", eta=0.5) == ["eta"]
    assert fields(num_samples=2, class_labels=[10]) == ["class_labels"]
    assert fields(num_samples=2, class_labels=[1, 2, 3]) == ["class_labels"]
    assert fields(max_cost=80, num_samples=4, steps=20) == []
    assert fields(max_cost=80, num_samples=4, steps=20, guidance_scale=2.0) == ["num_samples", "steps"]
    errs = check_request(GenerateRequest(num_samples=1, guidance_scale=2.0, class_labels=[1]), max_samples=4,
                         num_timesteps=100, num_classes=0)
    assert sorted(e["loc"][-1] for e in errs) == ["class_labels", "guidance_scale"]


@pytest.mark.parametrize("body,field", [({"num_samples": True}, "num_samples"), ({"num_samples": "2"}, "num_samples"),
                                        ({"steps": 2.0}, "steps"), ({"seed": "0"}, "seed"),
                                        ({"class_labels": [True]}, "class_labels"), ({"eta": False}, "eta"),
                                        ({"guidance_scale": "2"}, "guidance_scale")])
def test_request_schema_is_strict(body, field):
    import pydantic

    from pipelines.serve_schemas import GenerateRequest

    with pytest.raises(pydantic.ValidationError) as e:
        GenerateRequest.model_validate_json(__import__("json").dumps(body))
    assert e.value.errors()[0]["loc"][0] == field
    assert GenerateRequest.model_validate_json('{"eta": 1, "guidance_scale": 2, "steps": 3}').eta == 1.0


@pytest.mark.slow
def test_compiled_engine_pads_to_buckets_without_recompiling(model):
    from torch._dynamo.utils import counters

    e = Engine(max_batch_size=4, compile=True)
    e.swap(e.prepare(tiny_sampler(), "1"))  # compiles and warms up every bucket size
    graphs = dict(counters["stats"])
    tickets = [e.submit(s) for s in SPECS[:3]]  # forwards of 1..4 real rows
    drain(e)
    for spec, t in zip(SPECS[:3], tickets, strict=True):
        assert (t.result(0).images - oracle(model, spec)).abs().max().item() < 1e-3
    assert dict(counters["stats"]) == graphs  # no new compiles after warm-up


def test_engine_and_its_benchmark_import_no_ray_http_pydantic_or_mlflow(tmp_path):
    """The engine runs alone (e.g. a GPU box without Ray): block those packages and import both."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = ("import sys, importlib.util\n"
            "for m in ('ray', 'fastapi', 'pydantic', 'mlflow', 'starlette'): sys.modules[m] = None\n"
            "import pipelines.engine\n"
            f"spec = importlib.util.spec_from_file_location('engine_bench', {str(root / 'benchmarks/engine_bench.py')!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules['engine_bench'] = mod\n"
            "spec.loader.exec_module(mod)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**__import__("os").environ,
                                                                           "PYTHONPATH": str(root)})


# ---------------------------------------------------------------------------------- the Serve wrapper, no Serve
def _replica(model_uri: str, **serve_overrides):
    """A DiffusionIngress replica object built without Ray Serve (its routes are plain async methods)."""
    from pipelines import serve as ps
    from pipelines.config import ServeConfig

    raw = ps.DiffusionIngress.func_or_class.__mro__[1]  # the class under serve.ingress's ASGI wrapper
    obj = object.__new__(raw)
    raw.__init__(obj, model_uri, None, ServeConfig(**serve_overrides).model_dump(mode="json"))
    return obj


def test_replica_answers_503_until_a_model_loads_and_describe_names_the_load_error(tmp_path):
    import asyncio
    import json

    from pipelines.serve_schemas import GenerateRequest

    replica = _replica(str(tmp_path / "missing"), reload_interval_s=0)
    assert replica.follower.first_attempt.wait(60)
    health = asyncio.run(replica.healthz())
    assert health.status_code == 503 and json.loads(health.body)["loop_alive"] is True
    assert json.loads(health.body)["model_loaded"] is False and "missing" in json.loads(health.body)["load_error"]
    r = asyncio.run(replica.generate(GenerateRequest(num_samples=1, steps=2), request=None))
    assert r.status_code == 503 and r.headers["Retry-After"]
    with pytest.raises(RuntimeError, match="could not load"):
        asyncio.run(replica.describe(timeout_s=5))
    replica.engine.stop()


def test_replica_loads_a_model_directory_and_reports_its_limits(tmp_path, model):
    import asyncio
    import json

    from pipelines.model_io import write_model_dir

    write_model_dir(tmp_path / "m", model.unet.state_dict(), model.card)
    replica = _replica(str(tmp_path / "m"), max_samples_per_request=4)
    info = asyncio.run(replica.describe(timeout_s=120))
    assert info["num_timesteps"] == T and info["max_request_cost"] == 4 * T * 2
    assert replica.engine.max_queue_cost == 8 * 4 * T * 2
    assert json.loads(asyncio.run(replica.healthz()).body)["status"] == "ok"
    replica.engine.stop()


def test_server_faults_are_500_with_a_request_id_and_no_internals():
    import json

    from pipelines.engine import EngineError
    from pipelines.serve import _engine_error

    r = _engine_error(EngineError("secret internals: /etc/passwd"))
    body = json.loads(r.body)
    assert r.status_code == 500 and body["request_id"] and "secret" not in r.body.decode()
    assert r.headers["X-Request-Id"] == body["request_id"]
    assert _engine_error(TimedOut("late")).status_code == 504
    assert _engine_error(Overloaded("full")).headers["Retry-After"]
    assert [e["loc"][-1] for e in json.loads(_engine_error(TooCostly("x")).body)["detail"]] == ["num_samples", "steps"]
