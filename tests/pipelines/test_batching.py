"""Batch grouping, per-request noise and splitting of the sampling endpoint, without Ray Serve."""

from __future__ import annotations

import pytest
import torch

from pipelines.batching import (
    SampleJob,
    default_preview_every,
    group_jobs,
    images_in,
    progressive_events,
    row_generators,
    row_labels,
    run_jobs,
    split_rows,
)
from pipelines.serve_schemas import GenerateRequest, check_request


class RecordingSampler:
    """Stands in for DiffusionSampler: image i of a call is filled with its label*1000 + first uniform draw."""

    num_classes = 10

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[dict] = []
        self.fail_on = fail_on

    def labels_for(self, n, class_labels):
        if class_labels is None:
            return torch.arange(n) % self.num_classes
        return torch.tensor(class_labels).expand(n).clone() if len(class_labels) == 1 else torch.tensor(class_labels)

    def sample(self, n, *, sampler, steps, eta, guidance_scale, class_labels, generator):
        self.calls.append(dict(n=n, sampler=sampler, steps=steps, eta=eta, guidance=guidance_scale,
                               labels=class_labels, rows=len(generator)))
        if sampler == self.fail_on:
            raise ValueError("boom")
        noise = torch.stack([torch.rand((), generator=g) for g in generator])  # in [0, 1)
        return (torch.tensor(class_labels, dtype=torch.float32) * 1000 + noise).view(n, 1, 1, 1)


def job(n, seed, **kw):
    return SampleJob(num_samples=n, seed=seed, **kw)


def test_group_jobs_by_sampler_steps_eta_guidance_in_first_seen_order():
    jobs = [job(1, 0), job(2, 1, steps=20), job(1, 2), job(1, 3, eta=0.5), job(3, 4, steps=20),
            job(1, 5, guidance_scale=3.0), job(1, 6, sampler="ddpm")]
    assert group_jobs(jobs) == [[0, 2], [1, 4], [3], [5], [6]]
    assert images_in(jobs) == 10


def test_row_generators_repeat_each_jobs_generator_per_row():
    gens = row_generators([job(2, 7), job(1, 8)])
    assert len(gens) == 3 and gens[0] is gens[1] and gens[1] is not gens[2]
    assert gens[2].initial_seed() == 8


def test_row_labels_resolve_each_job_as_if_alone():
    s = RecordingSampler()
    assert row_labels(s, [job(3, 0), job(2, 1, class_labels=[7]), job(2, 2, class_labels=[4, 5])]) == \
        [0, 1, 2, 7, 7, 4, 5]


def test_split_rows_checks_the_total():
    parts = split_rows(torch.arange(6.0), [1, 2, 3])
    assert [p.tolist() for p in parts] == [[0.0], [1.0, 2.0], [3.0, 4.0, 5.0]]
    with pytest.raises(ValueError):
        split_rows(torch.arange(6.0), [1, 2])


def test_run_jobs_one_call_per_group_and_results_back_in_order():
    s = RecordingSampler()
    jobs = [job(2, 10, class_labels=[3]), job(1, 11, steps=20), job(3, 12, class_labels=[5])]
    out = run_jobs(s, jobs)
    assert [c["n"] for c in s.calls] == [5, 1]
    assert [(c["steps"], c["rows"]) for c in s.calls] == [(50, 5), (20, 1)]
    assert [r.batch_size for r in out] == [5, 1, 5]
    assert [r.images.shape[0] for r in out] == [2, 1, 3]
    assert (out[0].images.flatten() // 1000).tolist() == [3, 3]
    assert (out[2].images.flatten() // 1000).tolist() == [5, 5, 5]
    assert all(r.error is None and r.queue_ms >= 0 and r.sample_ms >= 0 for r in out)


def test_a_jobs_noise_does_not_depend_on_its_batch_mates():
    alone = run_jobs(RecordingSampler(), [job(3, 99)])[0].images
    mixed = run_jobs(RecordingSampler(), [job(2, 1), job(3, 99), job(4, 5)])[1].images
    assert torch.equal(alone, mixed)


def test_a_failing_group_fails_only_its_own_jobs():
    out = run_jobs(RecordingSampler(fail_on="ddpm"), [job(1, 0), job(1, 1, sampler="ddpm")])
    assert out[0].error is None and out[0].images is not None
    assert out[1].images is None and "boom" in out[1].error


def test_check_request_names_each_field():
    def fields(**kw):
        errs = check_request(GenerateRequest(**kw), max_samples=4, num_timesteps=100, num_classes=10)
        return [e["loc"][-1] for e in errs]

    assert fields(num_samples=4, steps=100) == []
    assert fields(num_samples=5) == ["num_samples"]
    assert fields(num_samples=1, steps=101) == ["steps"]
    assert fields(num_samples=1, sampler="dpm_solver", eta=0.5) == ["eta"]
    assert fields(num_samples=2, class_labels=[10]) == ["class_labels"]
    assert fields(num_samples=2, class_labels=[1, 2, 3]) == ["class_labels"]
    errs = check_request(GenerateRequest(num_samples=1, guidance_scale=2.0, class_labels=[1]), max_samples=4,
                         num_timesteps=100, num_classes=0)
    assert sorted(e["loc"][-1] for e in errs) == ["class_labels", "guidance_scale"]


# ---------------------------------------------------------------------------------- a real (tiny) sampler
@pytest.fixture(scope="module")
def tiny_sampler():
    from diffusion_core.models import UNet
    from pipelines.model_io import DiffusionSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only add contention on a shared 2-core machine
    torch.manual_seed(0)
    unet = UNet(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_classes=10, image_size=8, norm_groups=8)
    card = {"unet": unet.config, "diffusion": {"diffusion_steps": 50, "learn_sigma": False},
            "data": {"image_size": 8, "channels": 1, "num_classes": 10}, "training": {"steps": 0}}
    yield DiffusionSampler(unet=unet, card=card)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampler,steps,eta,guidance", [("ddim", 3, 0.0, 1.0), ("ddpm", 3, 0.0, 2.0),
                                                        ("ddim", 3, 1.0, 1.0), ("dpm_solver", 3, 0.0, 1.0)])
def test_real_sampler_same_seed_alone_or_batched(tiny_sampler, sampler, steps, eta, guidance):
    kw = dict(sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance)
    alone = run_jobs(tiny_sampler, [job(2, 1234, **kw)])[0]
    batched = run_jobs(tiny_sampler, [job(3, 1, **kw), job(2, 1234, **kw), job(1, 2, **kw)])
    assert batched[1].batch_size == 6 and alone.batch_size == 2
    assert (alone.images - batched[1].images).abs().max().item() <= 1e-4
    # and the same as the loader's own seeded call
    direct = tiny_sampler.sample(2, seed=1234, **kw)
    assert (alone.images - direct).abs().max().item() <= 1e-4


def test_progressive_events_previews_then_final_equal_to_batched(tiny_sampler):
    j = job(2, 77, steps=8, class_labels=[3])
    events = list(progressive_events(tiny_sampler, j, preview_every=3))
    assert [e["event"] for e in events] == ["preview", "preview", "final"]
    assert [e["step"] for e in events] == [3, 6, 8]
    final = run_jobs(tiny_sampler, [job(1, 5, steps=8), j])[1].images
    assert (events[-1]["images"] - final).abs().max().item() <= 1e-4
    assert default_preview_every(50) == 12 and default_preview_every(2) == 1
