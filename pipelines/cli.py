"""``diffusion-pipeline``: run the whole pipeline or any one stage with the same config.

Every command takes ``--config PATH`` (YAML, validated) and repeated ``--set section.field=value`` overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.config import ConfigError, PipelineConfig, dump_yaml, load_config

app = typer.Typer(
    name="diffusion-pipeline",
    help="Train and serve DDPM-family diffusion models: webdataset shards -> Ray Train (DDP) -> MLflow registry "
    "-> evaluation gate -> Ray Serve. Defaults run the embedded digits quickstart on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see configs/).",
                                                 exists=True, dir_okay=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", metavar="SECTION.FIELD=VALUE",
                                                  help="Override a config field; repeatable "
                                                       "(e.g. --set train.max_steps=200).")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address ('auto', 'ray://host:10001'); "
                                                "default: RAY_ADDRESS or a local Ray started on demand.")]


def _cfg(config: Path | None, sets: list[str] | None, address: str | None = None) -> PipelineConfig:
    extra = [f"ray.address={address}"] if address else []
    try:
        return load_config(config, [*(sets or []), *extra])
    except ConfigError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _done(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.GREEN)


@app.command("show-config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False) -> None:
    """Print the resolved configuration (file + overrides + defaults)."""
    cfg = _cfg(config, set_)
    typer.echo(json.dumps(cfg.to_dict(), indent=2) if as_json else dump_yaml(cfg))


@app.command("prepare-data")
def prepare_data_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Write webdataset shards + manifest.json for data.source (a no-op when they already exist)."""
    from pipelines.data import prepare_data

    res = prepare_data(_cfg(config, set_))
    state = "already prepared" if res.skipped else "prepared"
    _done(f"{state}: {res.num_train} train / {res.num_test} test samples, fingerprint {res.fingerprint}\n"
          f"manifest: {res.manifest_path}")


@app.command()
def train(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Train with Ray Train (DDP) and register the EMA model; the same train.run_name resumes."""
    from pipelines.data import prepare_data
    from pipelines.train import run_training

    cfg = _cfg(config, set_, address)
    res = run_training(cfg, prepare_data(cfg))
    _done(f"trained {res.steps} steps (run {res.mlflow_run_id}); registered {res.model_uri}\n"
          f"checkpoint: {res.checkpoint_path}")


@app.command()
def evaluate(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None,
             model_uri: Annotated[str | None, typer.Option(help="Model to evaluate (default: "
                                                           "models:/<registry.model_name>@latest-trained).")] = None,
             promote: Annotated[bool, typer.Option(help="Apply the promotion gate afterwards.")] = False) -> None:
    """Sample-quality metrics, bits/dim and the sampler table for a registered model; optionally promote it."""
    from pipelines.data import prepare_data
    from pipelines.evaluate import evaluate as run_eval
    from pipelines.evaluate import promote as run_promote
    from pipelines.model_io import resolve_model_version
    from pipelines.tracking import ensure_ray, setup_mlflow

    cfg = _cfg(config, set_, address)
    setup_mlflow(cfg)
    ensure_ray(cfg)
    uri = model_uri or f"models:/{cfg.registry.model_name}@latest-trained"
    res = run_eval(cfg, uri, prepare_data(cfg, progress=False))
    typer.echo(json.dumps(res.metrics, indent=2))
    if promote:
        info = resolve_model_version(uri)
        if not info:
            typer.secho("--promote needs a models:/ URI", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        dec = run_promote(cfg, info["name"], info["version"], res.metrics)
        _done(json.dumps(dec.model_dump(mode="json"), indent=2))


@app.command()
def serve(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None,
          model_uri: Annotated[str | None, typer.Option(help="Default: models:/<registry.model_name>@champion.")] = None,
          host: Annotated[str | None, typer.Option(help="Bind address (default serve.host, 127.0.0.1).")] = None,
          port: Annotated[int | None, typer.Option(help="HTTP port (default serve.port).")] = None) -> None:
    """Serve the model over HTTP with Ray Serve until Ctrl-C (or SIGTERM)."""
    from pipelines.serve import serve_forever

    extra = [f"serve.model_uri={model_uri}"] if model_uri else []
    extra += [f"serve.host={host}"] if host else []
    extra += [f"serve.port={port}"] if port else []
    serve_forever(_cfg(config, [*(set_ or []), *extra], address))


@app.command()
def sample(config: ConfigOpt = None, set_: SetOpt = None,
           model_uri: Annotated[str | None, typer.Option(help="Registry/run URI or local model dir "
                                                         "(default: models:/<registry.model_name>@champion).")] = None,
           url: Annotated[str | None, typer.Option(help="Sample from a running endpoint instead, "
                                                   "e.g. http://127.0.0.1:8000.")] = None,
           out: Annotated[Path, typer.Option(help="Output PNG grid.")] = Path("samples.png"),
           num_samples: Annotated[int, typer.Option(min=1, max=1024)] = 16,
           sampler: Annotated[str, typer.Option(help="ddpm | ddim | dpm_solver")] = "ddim",
           steps: Annotated[int, typer.Option(min=1)] = 50,
           guidance_scale: Annotated[float, typer.Option(min=0.0)] = 1.0,
           seed: Annotated[int, typer.Option()] = 0) -> None:
    """Write a PNG grid of samples from a model URI (or from a running endpoint with --url)."""
    from pydantic import ValidationError

    from pipelines.config import SamplerSpec, format_validation_error
    from pipelines.images import make_grid

    try:
        SamplerSpec(sampler=sampler, steps=steps)
    except ValidationError as e:
        typer.secho(f"error: {format_validation_error(e)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if url:
        from pipelines.client import generate_grid

        generate_grid(url, out, num_samples=num_samples, sampler=sampler, steps=steps,
                      guidance_scale=guidance_scale, seed=seed)
    else:
        from pipelines.model_io import load_model
        from pipelines.tracking import setup_mlflow

        cfg = _cfg(config, set_)
        setup_mlflow(cfg)
        m = load_model(model_uri or f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}")
        x = m.sample(num_samples, sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed,
                     progress=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        make_grid(x).save(out)
    _done(f"wrote {out.resolve()}")


@app.command()
def run(config: ConfigOpt = None, set_: SetOpt = None, address: AddressOpt = None,
        start: Annotated[str | None, typer.Option("--from", help="First stage to run (earlier ones must have "
                                                  "completed before).")] = None,
        until: Annotated[str | None, typer.Option("--until", help="Last stage to run.")] = None,
        force: Annotated[list[str] | None, typer.Option("--force", help="Re-run this stage and everything after "
                                                        "it; repeatable.")] = None,
        keep_serving: Annotated[bool, typer.Option("--serve", help="Keep serving after deploy (Ctrl-C "
                                                   "stops).")] = False) -> None:
    """Run the pipeline DAG: prepare_data -> train -> evaluate -> promote -> deploy.

    Stages whose config and inputs are unchanged and whose outputs exist are skipped; a failed stage leaves
    earlier stages' outputs intact, so re-running resumes after the last completed stage.
    """
    from pipelines.dag import StageError, run_pipeline
    from pipelines.storage import LockHeld

    cfg = _cfg(config, [*(set_ or []), *(["serve.keep_alive=true"] if keep_serving else [])], address)
    try:
        res = run_pipeline(cfg, start=start, until=until, force=force or [])
    except (StageError, ValueError, LockHeld) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    _summary(cfg, res, config)
    if cfg.serve.keep_alive and "deploy" in res.results and not cfg.ray.address:
        from pipelines.serve import serve_forever

        serve_forever(cfg)


def _summary(cfg: PipelineConfig, res, config: Path | None) -> None:
    r = res.results
    lines = [f"pipeline finished: ran {', '.join(res.ran) or 'nothing'}; skipped {', '.join(res.skipped) or 'none'}"]
    if "train" in r:
        lines.append(f"  model: {r['train'].get('model_uri')} ({r['train'].get('steps')} steps)")
    if "evaluate" in r:
        m = r["evaluate"].get("metrics", {})
        shown = {k: round(v, 4) for k, v in m.items() if isinstance(v, float)}
        lines.append(f"  metrics: {json.dumps(shown)}")
        for p in r["evaluate"].get("grid_paths", [])[:1]:
            lines.append(f"  sample grid: {p}")
    if "promote" in r:
        lines.append(f"  promotion: {r['promote'].get('decision')} - {r['promote'].get('reason')}")
    if "deploy" in r:
        d = r["deploy"]
        lines.append(f"  endpoint checked: {d.get('url')} ({d.get('status', 'ok')})")
        cfg_arg = f" --config {config}" if config else ""
        lines.append(f"  serve the champion until Ctrl-C: diffusion-pipeline serve{cfg_arg}")
        lines.append(f"  then: curl -s -X POST {d.get('url', 'http://127.0.0.1:8000')}/v1/generate "
                     "-H 'Content-Type: application/json' -d '{\"num_samples\": 4, \"class_labels\": [3]}'")
    lines.append(f"  MLflow UI: mlflow ui --backend-store-uri {cfg.tracking_uri}")
    _done("\n".join(lines))


def main() -> None:
    try:
        app()
    except ConfigError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
