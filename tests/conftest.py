"""Shared test environment: loopback-only Ray with auth disabled, one cluster per session."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipelines.cluster import local_env

for _k, _v in local_env("disabled").items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# DeepSpeed's JIT comm op is built once by `python -m pipelines.prebuild` into this folder.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"),
)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped only where no CUDA device exists."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; its CPU counterpart runs instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, loopback, dashboard on) shared by every Ray test."""
    import ray

    from dcm.config import RayConfig
    from pipelines.cluster import init_ray

    ctx = init_ray(
        RayConfig(
            num_cpus=max(2, os.cpu_count() or 2),
            num_gpus=0,
            object_store_mb=384,
            dashboard=True,
            dashboard_port=free_port(),  # concurrent test sessions must not collide
        ),
        quiet=True,
    )
    yield ctx
    ray.shutdown()
