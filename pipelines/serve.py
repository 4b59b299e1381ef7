"""`dcm serve`: run the Ray Serve text-to-video endpoint and block until Ctrl-C.

    dcm serve [--config serve/config.yaml] [--model PATH] [--host 127.0.0.1] [--port 8000]
              [--device auto|cpu|cuda] [--set serve.max_replicas=4 ...] [--dry-run]
              [--write-config PATH|-]

Routes: ``POST /v1/generate`` (waits for the video) and the job API ``/v1/videos`` (202 at
once, then poll and download; jobs kept in ``serve.job_store``); see README "HTTP API".

Every setting lives in the ``serve`` section of the config (``--dry-run --explain`` lists
them). ``--config`` takes a dcm experiment YAML or a Serve config file (``applications:``, as
``serve run`` / ``serve deploy`` read): from the latter come the builder ``args``, the
``http_options`` host/port and any Generator deployment options (see ``serve.settings``), so
``dcm serve`` and ``serve run`` serve the same thing; flags given here win over the file.
``--write-config PATH`` writes the Serve config file of the resolved settings instead of
serving (``-``: stdout); ``serve/config.yaml`` and the RayService's ``serveConfigV2`` are
written this way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pipelines.args
from dcm.config import Config
from serve.settings import (
    APP_NAME,
    deploy_config,
    http_options,
    proxy_location,
    read_serve_file,
    render,
)

log = logging.getLogger(__name__)


def start(cfg: Config, name: str = APP_NAME) -> str:
    """Deploy the app on the connected Ray cluster (Serve listening on serve.host:port);
    returns the base URL once every replica is up."""
    from ray import serve

    from pipelines.registry import with_local_model
    from serve.app import app_from_config

    cfg = with_local_model(cfg)  # models:/NAME/VERSION -> its exported folder
    serve.start(proxy_location=proxy_location(cfg.serve), http_options=http_options(cfg.serve))
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
        "--model",
        metavar="PATH",
        help="distilled artifact, bundle folder, bundled:shapes (the teacher) or hub id "
        "(default: the bundled distilled student bundled:shapes-dcm)",
    )
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="generator device")
    parser.add_argument(
        "--write-config",
        metavar="PATH",
        help="write the Serve config file (serve run / serve deploy) of these settings to "
        "PATH ('-': stdout) and exit",
    )
    pipelines.args.add_common(parser)
    args = parser.parse_args(argv)

    dotted: dict[str, Any] = {}
    if args.config:
        found = read_serve_file(args.config)
        if found is not None:
            app_args, dotted = found
            dotted.update(app_args.overrides())
            args.config, args.preset = app_args.config, args.preset or app_args.preset
            args.overrides = [*app_args.set, *args.overrides]
    cli = {
        # no model given: the bundled distilled student (pipelines.args.model_or_default)
        "model.path": pipelines.args.model_or_default(args, args.model or dotted.get("model.path")),
        "serve.host": args.host,
        "serve.port": args.port,
        "serve.device": args.device,
    }
    # File values first, then --set, then the flags of this command.
    extra = [f"{k}={json.dumps(v)}" for k, v in dotted.items()]  # JSON is valid YAML
    args.overrides = [*extra, *args.overrides]
    cfg = pipelines.args.resolve(args, **cli)
    if args.write_config:
        command = sys.argv[1:] if argv is None else argv
        text = render(deploy_config(cfg, args.config, args.preset), command)
        if args.write_config == "-":
            print(text, end="")
        else:
            Path(args.write_config).write_text(text)
            print(args.write_config)
        return 0

    from pipelines.cluster import init_ray, shutdown

    ctx = init_ray(cfg.ray)
    try:
        url = start(cfg)
        log.info("serving %s at %s  (docs: %s/docs; Ctrl-C stops)", cfg.model.path, url, url)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        stop()
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(pipelines.args.run_main(main))
