"""PipelineConfig: YAML + overrides validated, errors name the field path and accepted values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, PipelineConfig, dump_yaml, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


def test_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "cifar10_ddpm.yaml", "cluster_example.yaml"}


def test_cifar10_config_has_ho_et_al_hyperparameters():
    cfg = load_config(Path(__file__).parents[2] / "configs" / "cifar10_ddpm.yaml")
    assert (cfg.train.batch_size * cfg.train.num_workers, cfg.train.lr, cfg.train.warmup_steps) == (128, 2e-4, 5000)
    assert (cfg.train.max_steps, cfg.model.dropout, cfg.diffusion.noise_schedule) == (800_000, 0.1, "linear")
    assert cfg.train.ema_decays == [0.9999] and cfg.diffusion.sigma_small is False  # fixed-large variance


def test_overrides_are_yaml_typed():
    cfg = load_config(None, ["train.max_steps=200", "model.channel_mult=[1,2]", "train.compile=true"])
    assert cfg.train.max_steps == 200 and cfg.model.channel_mult == [1, 2] and cfg.train.compile is True


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (["data.image_size=-1"], "data.image_size"),
        (["data.source=mnist"], "data.source"),
        (["train.num_workers=0"], "train.num_workers"),
        (["diffusion.noise_schedule=cosinus"], "diffusion.noise_schedule"),
        (["train.bogus=1"], "train.bogus: unknown key"),
        (["train.ema_decays=[1.5]"], "train.ema_decays"),
        (["data.source=cifar10"], "data.path is required"),
        (["serve.reload_interval_s=-1"], "serve.reload_interval_s"),
    ],
)
def test_errors_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_literal_errors_list_accepted_values():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=mnist"])
    for ok in ("digits", "image_folder", "cifar10", "shards"):
        assert ok in str(e.value)


def test_sampler_names_are_the_cores():
    from typing import get_args

    from diffusion_core.samplers import SAMPLERS
    from pipelines.config import SamplerName

    assert get_args(SamplerName) == SAMPLERS


def test_unknown_section_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainn:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trainn: unknown key"):
        load_config(p)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.max_steps")


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7"])
    p = tmp_path / "dump.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg and yaml.safe_load(p.read_text())["train"]["max_steps"] == 7


def test_section_fingerprint_tracks_only_its_sections():
    a, b = load_config(None, ["train.max_steps=7"]), load_config(None, ["train.max_steps=8"])
    assert a.section_fingerprint("data") == b.section_fingerprint("data")
    assert a.section_fingerprint("train") != b.section_fingerprint("train")


def test_serve_pack_ratio_auto_is_decided_by_device():
    from pipelines.config import resolve_pack_ratio

    cfg = load_config(None, [])
    assert cfg.serve.pack_ratio == "auto"
    assert resolve_pack_ratio("auto", "cpu") == 4.0 and resolve_pack_ratio("auto", "cuda") is None
    assert resolve_pack_ratio(None, "cpu") is None and resolve_pack_ratio(2.5, "cuda") == 2.5
    assert load_config(None, ["serve.pack_ratio=null"]).serve.pack_ratio is None
    with pytest.raises(ConfigError, match="serve.pack_ratio"):
        load_config(None, ["serve.pack_ratio=0.5"])


def test_mixed_precision_accepts_its_three_values_and_explains_a_bare_yaml_no():
    for value in ("'no'", "bf16", "fp16"):
        assert load_config(None, [f"train.mixed_precision={value}"]).train.mixed_precision == value.strip("'")
    assert load_config(None, []).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*YAML reads a bare no as false"):
        load_config(None, ["train.mixed_precision=no"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision.*'no', 'bf16' or 'fp16'"):
        load_config(None, ["train.mixed_precision=fp8"])
