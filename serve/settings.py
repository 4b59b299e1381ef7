"""Serve settings from their one owner, the ``serve`` section of the dcm config.

Every number of the endpoint (limits, replicas, autoscaling, batching, queues, timeouts)
is a field of ``dcm.config.ServeConfig``. This module derives what Ray Serve needs from it:

- ``generator_options``: the generator's deployment options (``GENERATOR_OPTIONS`` is the
  one table between Serve's option names and the config's fields, read both ways);
- ``AppArgs``: the builder args of ``serve.app:build_app`` (``config``/``preset``, ``model``,
  any serve field by name, further dotted keys in ``set``);
- ``deploy_config`` / ``render``: the Serve config file of ``serve run`` / ``serve deploy``
  and of a RayService, written by ``dcm serve --write-config PATH`` (serve/config.yaml is one);
- ``read_serve_file``: such a file back as builder args and dotted keys (``dcm serve --config``).

No ray import here: ``dcm serve --write-config`` and ``--dry-run`` stay quick.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import shlex
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dcm.config import (
    Config,
    ConfigError,
    ServeConfig,
    artifact_base,
    load_config,
    read_yaml_file,
)

APP_NAME = "dcm"
IMPORT_PATH = "serve.app:build_app"
GENERATOR = "Generator"
# Serve's own HTTP timeout is a backstop behind the app's 504 at serve.request_timeout_s.
HTTP_TIMEOUT_MARGIN_S = 30.0
# Serve's default metrics interval: the knob is deprecated, so it is passed only when changed.
SERVE_METRICS_INTERVAL_S = 10.0

# Generator deployment option (dotted) -> serve field.
GENERATOR_OPTIONS: dict[str, str] = {
    "max_ongoing_requests": "max_ongoing_requests",
    "max_queued_requests": "max_queued",
    "ray_actor_options.num_cpus": "replica_cpus",
    "ray_actor_options.num_gpus": "replica_gpus",
    "autoscaling_config.min_replicas": "min_replicas",
    "autoscaling_config.max_replicas": "max_replicas",
    "autoscaling_config.target_ongoing_requests": "target_ongoing_requests",
    "autoscaling_config.upscale_delay_s": "upscale_delay_s",
    "autoscaling_config.downscale_delay_s": "downscale_delay_s",
    "autoscaling_config.look_back_period_s": "look_back_period_s",
    "autoscaling_config.metrics_interval_s": "metrics_interval_s",
}
# Serve fields that are cluster-wide HTTP options, not builder args.
HTTP_FIELDS = ("host", "port")
HTTP_KEYS = tuple(f"serve.{f}" for f in HTTP_FIELDS)
SOURCE_ARGS = ("config", "preset", "model", "set")


def generator_options(s: ServeConfig) -> dict[str, Any]:
    """Deployment options of the generator (``s.replica_gpus`` already resolved to a number)."""
    out: dict[str, Any] = {"max_constructor_retry_count": 3}  # a broken model fails the deploy
    for option, name in GENERATOR_OPTIONS.items():
        value = getattr(s, name)
        if name == "metrics_interval_s" and value == SERVE_METRICS_INTERVAL_S:
            continue
        *parents, leaf = option.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return out


def proxy_location(s: ServeConfig) -> str:
    """One HTTP proxy on the head node when Serve listens on loopback (a proxy elsewhere could
    not be reached); else one on every node, behind the cluster's load balancer."""
    try:
        loopback = ipaddress.ip_address(s.host).is_loopback
    except ValueError:
        loopback = s.host == "localhost"
    return "HeadOnly" if loopback else "EveryNode"


def http_options(s: ServeConfig) -> dict[str, Any]:
    return {
        "host": s.host,
        "port": s.port,
        "request_timeout_s": s.request_timeout_s + HTTP_TIMEOUT_MARGIN_S,
    }


def serve_fields() -> list[str]:
    """Serve fields a builder arg may name (all but the cluster-wide HTTP ones)."""
    return [f.name for f in dataclasses.fields(ServeConfig) if f.name not in HTTP_FIELDS]


class AppArgs(BaseModel):
    """Builder arguments (the ``args`` of the application in a Serve config file)."""

    model_config = ConfigDict(extra="allow")

    config: str | None = None  # experiment YAML (dcm.config); its serve section applies
    preset: str | None = None
    model: str | None = None  # bundle folder, distilled artifact or 'bundled:shapes'
    set: list[str] = []  # further dotted keys, e.g. ["model.fps=8"]

    @classmethod
    def parse(cls, args: dict[str, Any] | None, where: str = "application args") -> AppArgs:
        """Validated args; a bad one is a ConfigError naming it (did-you-mean for typos)."""
        try:
            parsed = cls.model_validate(args or {})
        except ValidationError as err:
            first = err.errors()[0]
            name = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{where}: {name}: {first['msg']}") from None
        known = [*SOURCE_ARGS, *serve_fields()]
        for name in parsed.model_extra or {}:
            if name in HTTP_FIELDS:
                raise ConfigError(f"{where}: '{name}' is not an app arg: set http_options.{name}")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = (
                    f"did you mean '{close[0]}'?" if close else "see dcm serve --dry-run --explain"
                )
                raise ConfigError(f"{where}: unknown arg '{name}'; {hint}")
        return parsed

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys given by these args (None = not given)."""
        out: dict[str, Any] = {"model.path": self.model}
        out.update({f"serve.{k}": v for k, v in (self.model_extra or {}).items()})
        return {k: v for k, v in out.items() if v is not None}

    def resolve(self) -> Config:
        """The config these args name. Only a distilled artifact given (no config, no
        preset): its training config is the base, as for every ``dcm`` command."""
        AppArgs.parse(self.model_dump())  # unknown names fail here, in one sentence
        base = artifact_base(self.model, self.config, self.preset)
        cfg = load_config(self.config, self.preset, self.set, base=base)
        return cfg.replace(**self.overrides())


# Config keys the endpoint reads (prefixes); the rest (train.*, ingest.*, sweep.*, where the
# training clips live) only shaped how a model was made and stays out of the Serve file.
SERVE_READS = (
    *("model.", "method.", "lora.", "sample.", "ray.", "serve."),
    *("data.num_frames", "data.height", "data.width"),
)


def app_args(cfg: Config, config: str | None = None, preset: str | None = None) -> dict[str, Any]:
    """Builder args that resolve to ``cfg`` as far as Serve reads it: its source and every
    key Serve reads where ``cfg`` differs from that source, serve fields by name.

    The source is the ``config`` file or ``preset`` when given; else the distilled artifact
    ``cfg`` serves (its own training config, so the file does not repeat the grid or sizes
    it was built with and stays right when it is rebuilt); else ``cfg``'s preset.
    """
    artifact = artifact_base(cfg.model.path, config, preset)
    if artifact is not None:
        source: dict[str, Any] = {"model": cfg.model.path}
        base = load_config(base=artifact).flat()
    else:
        source = {"config": config} if config else {}
        source["preset"] = preset if (preset or config) else cfg.preset
        source = {k: v for k, v in source.items() if v}
        base = load_config(source.get("config"), source.get("preset")).flat()
    args: dict[str, Any] = dict(source)
    extra: list[str] = []
    for key, value in cfg.flat().items():
        if key == "preset" or key in HTTP_KEYS or value == base.get(key):
            continue
        if not key.startswith(SERVE_READS):
            continue
        if key == "model.path":
            args.setdefault("model", value)
        elif key.startswith("serve."):
            args[key.split(".", 1)[1]] = value
        else:
            extra.append(f"{key}={json.dumps(value)}")  # JSON is YAML
    if extra:
        args["set"] = extra
    return args


def deploy_config(cfg: Config, config: str | None = None, preset: str | None = None) -> dict:
    """The Serve config (``ServeDeploySchema``) of the endpoint ``cfg`` describes."""
    return {
        "proxy_location": proxy_location(cfg.serve),
        "http_options": http_options(cfg.serve),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args(cfg, config, preset),
            }
        ],
    }


def render(deploy: dict[str, Any], argv: list[str]) -> str:
    """The Serve config file's text: the ``dcm serve`` command that wrote it, then the YAML."""
    return _HEAD.format(command=_wrap(["dcm", "serve", *argv])) + yaml.safe_dump(
        deploy, sort_keys=False
    )


_HEAD = """\
# Ray Serve config of the DCM text-to-video endpoint, written from the serve section of
# dcm/config.py by (do not edit: change the command and run it again)
{command}
# `serve run FILE` (local: starts Ray + Serve, blocks), `serve deploy FILE` (a running
# cluster) and `dcm serve --config FILE` serve the same app. The builder resolves `args`
# into the dcm config, where every number lives: `dcm serve --config FILE --dry-run`.
"""


def _wrap(argv: list[str], width: int = 84) -> str:
    """``argv`` as comment lines continued by backslashes, an option beside its value."""
    words: list[str] = []
    for arg in argv:
        if (
            words
            and words[-1].startswith("--")
            and " " not in words[-1]
            and not arg.startswith("--")
        ):
            words[-1] += " " + shlex.quote(arg)
        else:
            words.append(shlex.quote(arg))
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append("  " + word)
        else:
            lines[-1] += " " + word
    return " \\\n".join(f"#   {line}" for line in lines)


def command_of(text: str) -> list[str]:
    """The ``dcm serve`` arguments recorded in a rendered file's header (see ``render``)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#   dcm serve"))
    parts = []
    for line in lines[start:]:
        parts.append(line[1:].strip().removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(parts))[2:]


def read_serve_file(path: str) -> tuple[AppArgs, dict[str, Any]] | None:
    """(builder args, dotted keys of its http_options and Generator deployment options) of a
    Serve config file; None when ``path`` is a dcm experiment YAML instead."""
    data = read_yaml_file(path)
    if not isinstance(data, dict) or "applications" not in data:
        return None
    apps = data["applications"] or []
    if len(apps) != 1:
        raise ConfigError(f"{path}: 'applications' must hold exactly one application for dcm serve")
    app = apps[0]
    dotted: dict[str, Any] = {}
    http = data.get("http_options") or {}
    for key in HTTP_FIELDS:
        if key in http:
            dotted[f"serve.{key}"] = http[key]
    for dep in app.get("deployments") or []:
        if dep.get("name") != GENERATOR:
            continue
        for key, val in _flatten({k: v for k, v in dep.items() if k != "name"}).items():
            if key not in GENERATOR_OPTIONS:
                raise ConfigError(
                    f"{path}: deployment option '{GENERATOR}.{key}' is not supported by dcm "
                    f"serve (supported: {', '.join(GENERATOR_OPTIONS)}); use `serve run {path}`"
                )
            dotted[f"serve.{GENERATOR_OPTIONS[key]}"] = val
    return AppArgs.parse(app.get("args"), f"{path}: application args"), dotted


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in d.items():
        if isinstance(val, dict):
            out.update(_flatten(val, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = val
    return out
