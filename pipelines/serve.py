"""`dcm serve`: run the Ray Serve text-to-video endpoint and block until Ctrl-C.

    dcm serve [--config serve/config.yaml] [--model PATH] [--host 127.0.0.1] [--port 8000]
              [--device auto|cpu|cuda] [--set serve.max_replicas=4 ...] [--dry-run]

Routes: ``POST /v1/generate`` (waits for the video) and the job API ``/v1/videos`` (202 at
once, then poll and download; jobs kept in ``serve.job_store``); see README "HTTP API".

``--config`` takes either a Serve config file (has ``applications:``, as used by ``serve run``
and ``serve deploy``) or a dcm experiment YAML. From a Serve file we read the application's
builder ``args``, ``http_options`` host/port and the generator's deployment options, and map
them onto the ``serve`` config section, so ``dcm serve`` and ``serve run`` serve the same
thing. Flags given here win over the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pydantic import ValidationError

import pipelines.args
from dcm.config import Config, ConfigError, read_yaml_file

# Serve YAML deployment option -> dotted dcm config key (generator deployment only).
DEPLOYMENT_KEYS = {
    "max_ongoing_requests": "serve.max_ongoing_requests",
    "max_queued_requests": "serve.max_queued",
    "ray_actor_options.num_cpus": "serve.replica_cpus",
    "ray_actor_options.num_gpus": "serve.replica_gpus",
    "autoscaling_config.min_replicas": "serve.min_replicas",
    "autoscaling_config.max_replicas": "serve.max_replicas",
    "autoscaling_config.target_ongoing_requests": "serve.target_ongoing_requests",
    "autoscaling_config.upscale_delay_s": "serve.upscale_delay_s",
    "autoscaling_config.downscale_delay_s": "serve.downscale_delay_s",
    "autoscaling_config.look_back_period_s": "serve.look_back_period_s",
    "autoscaling_config.metrics_interval_s": "serve.metrics_interval_s",
}


def read_serve_file(path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(builder args, dotted overrides) from a Serve config file; None for an experiment YAML."""
    data = read_yaml_file(path)
    if not isinstance(data, dict) or "applications" not in data:
        return None
    apps = data["applications"] or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: 'applications' must hold exactly one application for dcm serve")
    app = apps[0]
    dotted: dict[str, Any] = {}
    http = data.get("http_options") or {}
    for key in ("host", "port"):
        if key in http:
            dotted[f"serve.{key}"] = http[key]
    for dep in app.get("deployments") or []:
        if dep.get("name") != "Generator":
            continue
        for key, val in _flatten({k: v for k, v in dep.items() if k != "name"}).items():
            if key not in DEPLOYMENT_KEYS:
                raise ConfigError(
                    f"{path}: deployment option 'Generator.{key}' is not supported by dcm serve "
                    f"(supported: {', '.join(DEPLOYMENT_KEYS)}); use `serve run {path}` for it"
                )
            dotted[DEPLOYMENT_KEYS[key]] = val
    return dict(app.get("args") or {}), dotted


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in d.items():
        if isinstance(val, dict):
            out.update(_flatten(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val
    return out


def start(cfg: Config, name: str = "dcm") -> str:
    """Deploy the app on the connected Ray cluster (Serve listening on serve.host:port);
    returns the base URL once every replica is up."""
    from ray import serve

    from pipelines.registry import with_local_model
    from serve.app import app_from_config

    cfg = with_local_model(cfg)  # models:/NAME/VERSION -> its exported folder
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app_from_config(cfg), name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def stop() -> None:
    from ray import serve

    serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dcm serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", metavar="PATH", help="bundle folder, distilled artifact or bundled:shapes"
    )
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="generator device")
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)

    dotted: dict[str, Any] = {}
    if args.config:
        from serve.app import AppArgs

        found = read_serve_file(args.config)
        if found is not None:
            app_args, dotted = found
            try:
                parsed = AppArgs.model_validate(app_args)
            except ValidationError as err:
                first = err.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ConfigError(
                    f"{args.config}: application args: {where}: {first['msg']}"
                ) from None
            dotted.update(parsed.overrides())
            args.config, args.preset = parsed.config, args.preset or parsed.preset
            args.overrides = [*parsed.set, *args.overrides]
    cli = {
        "model.path": args.model,
        "serve.host": args.host,
        "serve.port": args.port,
        "serve.device": args.device,
    }
    # File values first, then --set, then the flags of this command.
    extra = [f"{k}={json.dumps(v)}" for k, v in dotted.items()]  # JSON is valid YAML
    args.overrides = [*extra, *args.overrides]
    cfg = pipelines.args.resolve(args, **cli)

    from pipelines.cluster import init_ray, shutdown

    ctx = init_ray(cfg.ray)
    try:
        url = start(cfg)
        print(
            f"[dcm] serving {cfg.model.path} at {url}  (docs: {url}/docs; Ctrl-C stops)", flush=True
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[dcm] stopping", file=sys.stderr)
    finally:
        stop()
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
