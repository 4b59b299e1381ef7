"""Ray bootstrap shared by every stage.

Inside `ray job submit` (or with RAY_ADDRESS / `ray.address` set) we connect to that
cluster. Otherwise we start a local one bound to 127.0.0.1 with an explicit auth mode,
detected CPUs/GPUs and an object store Ray sizes from the machine unless
``ray.object_store_mb`` is set (RUNTIME.md: Ray 2.60 enables token auth by default and
binds eth0 unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set). HF_HUB_OFFLINE=1 is set
only when the stage's model is a local folder or bundled: a hub id may download.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from dcm.config import RayConfig

log = logging.getLogger(__name__)

# Environment every local Ray process must share (driver, raylet, workers).
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # listen on loopback only
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": "1",
    # imageio-ffmpeg's preexec_fn forces fork() of a multi-threaded Ray worker, which can
    # abort; without it Python spawns ffmpeg with vfork/posix_spawn.
    "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT": "1",
}


@dataclass(frozen=True)
class RayContext:
    address: str
    dashboard_url: str | None
    started_here: bool


def local_env(auth_mode: str = "disabled", model: str | None = None) -> dict[str, str]:
    """The environment for a loopback-only local cluster with the given auth mode; offline
    (HF_HUB_OFFLINE=1) unless ``model`` is a hub id."""
    return {**LOCAL_ENV, **hub_env(model), "RAY_AUTH_MODE": auth_mode}


def hub_env(model: str | None) -> dict[str, str]:
    """{'HF_HUB_OFFLINE': '1'} for a local or bundled model (nothing to download, no network
    lookups), {} for a hub id 'owner/name', which downloads where there is network."""
    from dcm.bundle import is_hub_id

    return {} if model and is_hub_id(model) else {"HF_HUB_OFFLINE": "1"}


def progress_env() -> dict[str, str]:
    """How Ray shows progress, for where this command's output goes.

    In a terminal: nothing to change, Ray's live bars (a worker's bars are drawn by the
    driver through ray tqdm). Into a file or a pipe (``make demo > log``): no bars, whose
    carriage-return redraws fill a log; Ray Data logs one line per operator every
    ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds instead (Ray 2.60 does that by itself
    for a driver whose stdout is not a terminal, but not for a dataset run inside a worker,
    e.g. a Train worker's shard, unless ray tqdm is off: ``RAY_TQDM=0``).
    """
    if sys.stdout.isatty() and sys.stderr.isatty():
        return {}
    return {
        "RAY_TQDM": "0",
        "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": os.environ.get(
            "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "30"
        ),
    }


def _apply_progress_env(env: dict[str, str]) -> None:
    """``progress_env()`` in this (driver) process: the datasets it builds carry its Ray Data
    context to the workers that run them, so the context must say it too when ray.data was
    imported before the variable was set."""
    for key, val in env.items():
        os.environ.setdefault(key, val)
    if os.environ.get("RAY_TQDM") == "0" and "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().use_ray_tqdm = False


def _cluster_total(resource: str) -> float:
    import ray

    return float(ray.cluster_resources().get(resource, 0))


def cluster_gpus() -> float:
    """GPUs of the connected Ray cluster (what the 'auto' GPU settings follow)."""
    return _cluster_total("GPU")


def actor_gpus(setting: str | float) -> float:
    """A per-actor GPU setting (``ingest.actor_gpus``, ``serve.replica_gpus``): a number as
    it is; 'auto' = one GPU when the connected cluster has a whole one, else 0 (also with no
    Ray started: an app built in a test or a dry run)."""
    if setting != "auto":
        return float(setting)
    import ray

    if not ray.is_initialized():
        return 0.0
    return 1.0 if cluster_gpus() >= 1 else 0.0


def cluster_cpus() -> float:
    """CPUs of the connected Ray cluster (what concurrent sweep trials must leave room in)."""
    return _cluster_total("CPU")


def init_ray(
    cfg: RayConfig | None = None, quiet: bool = False, model: str | None = None
) -> RayContext:
    """Connect to the configured/ambient cluster, or start a local loopback one.

    ``model``: the stage's model path; a hub id leaves HF_HUB_OFFLINE unset (module doc).
    """
    import ray

    cfg = cfg or RayConfig()
    progress = progress_env()
    _apply_progress_env(progress)
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RayContext(ctx.gcs_address, _dashboard_url(), started_here=False)
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        if address not in ("auto", "local") and not address.startswith(("127.", "ray://127.")):
            # pipelines/__init__ forced loopback-only mode for local runs; a driver joining
            # a remote cluster must advertise its real address instead.
            import ray._private.ray_constants as ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = True
        ray.init(address=address, log_to_driver=True)
        return RayContext(address, _dashboard_url(), started_here=False)

    env = local_env(os.environ.get("RAY_AUTH_MODE", cfg.auth_mode), model)
    for key, val in env.items():
        os.environ.setdefault(key, val)
    num_gpus = cfg.num_gpus if cfg.num_gpus >= 0 else _detect_gpus()
    info = ray.init(
        num_cpus=cfg.num_cpus or os.cpu_count(),
        num_gpus=num_gpus,
        object_store_memory=cfg.object_store_mb * 1024 * 1024 or None,  # None: Ray sizes it
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_dashboard_port(cfg.dashboard_port) if cfg.dashboard else None,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {**LOCAL_ENV, **hub_env(model), **progress}},
        log_to_driver=True,
    )
    url = info.dashboard_url
    url = f"http://{url}" if url and not url.startswith("http") else url
    if not quiet:
        where = f"; dashboard: {url}" if url else ""
        log.info("started a local Ray cluster on 127.0.0.1%s", where)
    return RayContext(info.address_info["gcs_address"], url, started_here=True)


def _free_dashboard_port(port: int) -> int:
    """``port``, or a free one when another local cluster (a second `dcm` command on this
    machine) already holds it: Ray would refuse to start rather than pick another."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    log.warning("port %d is taken (another Ray cluster?): dashboard on %d", port, free)
    return free


def _detect_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - any failure simply means no GPU
        return 0


def _dashboard_url() -> str | None:
    try:
        import ray

        url = (
            ray.get_runtime_context().get_dashboard_url()
            if hasattr(ray.get_runtime_context(), "get_dashboard_url")
            else None
        )
        return url
    except Exception:  # noqa: BLE001
        return None


def shutdown(ctx: RayContext) -> None:
    """Stop a cluster this process started; leave a shared one alone."""
    import ray

    if ctx.started_here and ray.is_initialized():
        ray.shutdown()
