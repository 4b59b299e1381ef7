import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def _listening_ports_non_loopback() -> list[str]:
    """Ray-owned TCP listeners bound to a non-loopback address (from /proc/net/tcp)."""
    bad = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, state = parts[1], parts[3]
        if state != "0A":  # LISTEN
            continue
        ip_hex = local.split(":")[0]
        ip = socket.inet_ntoa(bytes.fromhex(ip_hex)[::-1])
        if ip not in ("127.0.0.1", "0.0.0.0"):
            bad.append(ip)
    return bad


def test_local_cluster_is_loopback_only(ray_cluster):
    import ray

    assert ray.is_initialized()
    assert ray_cluster.address.startswith("127.0.0.1:")
    nodes = ray.nodes()
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert _listening_ports_non_loopback() == []

    @ray.remote(num_cpus=0.5)
    def ping() -> str:
        import os

        return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "")

    assert ray.get(ping.remote()) == "0"


def test_init_ray_reuses_running_cluster(ray_cluster):
    from pipelines.cluster import init_ray

    ctx = init_ray()
    assert not ctx.started_here
