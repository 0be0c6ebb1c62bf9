"""The CLI surface: --help is complete, show-config resolves files + overrides, bad input exits 2 naming the field."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()
COMMANDS = ("run", "prepare-data", "train", "evaluate", "serve", "sample", "show-config")


def test_top_level_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_takes_config_and_set(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "--config" in res.output and "--set" in res.output


def test_run_help_explains_partial_runs():
    out = runner.invoke(app, ["run", "--help"]).output
    for opt in ("--from", "--until", "--force", "--address", "--serve"):
        assert opt in out


def test_show_config_applies_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 11\n")
    res = runner.invoke(app, ["show-config", "--config", str(p), "--set", "data.image_size=8", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["train"]["max_steps"] == 11 and d["data"]["image_size"] == 8
    res = runner.invoke(app, ["show-config", "--config", str(p)])
    assert yaml.safe_load(res.output)["train"]["max_steps"] == 11


def test_bad_override_exits_2_and_names_the_field():
    res = runner.invoke(app, ["show-config", "--set", "train.num_workers=0"])
    assert res.exit_code == 2
    assert "train.num_workers" in res.output


def test_missing_config_file_is_a_usage_error(tmp_path):
    res = runner.invoke(app, ["show-config", "--config", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_bad_sampler_flag_exits_2_and_lists_the_samplers():
    res = runner.invoke(app, ["sample", "--sampler", "euler"])
    assert res.exit_code == 2
    assert "sampler" in res.output and "'euler'" in res.output
    for ok in ("ddpm", "ddim", "dpm_solver"):
        assert ok in res.output
