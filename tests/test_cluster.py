import os
import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _descendants(root: int) -> set[int]:
    """``root`` and every process below it (Ray's GCS, raylet, dashboard, workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP listener (IPv4 and IPv6) owned by one of ``pids``."""
    inodes, out = _socket_inodes(pids), []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                ip, port = local.split(":")
                out.append((_address(ip), int(port, 16)))
    return out


def test_local_cluster_is_loopback_only(ray_cluster):
    import ray

    assert ray.is_initialized()
    assert ray_cluster.address.startswith("127.0.0.1:")
    nodes = ray.nodes()
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    ours = listening(_descendants(os.getpid()))
    assert len(ours) >= 3  # GCS, raylet, dashboard, ...: the check sees Ray's sockets
    assert [a for a in ours if a[0] not in LOOPBACK] == [], "Ray listens beyond loopback"

    @ray.remote(num_cpus=0.5)
    def ping() -> str:
        import os

        return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "")

    assert ray.get(ping.remote()) == "0"


def test_init_ray_reuses_running_cluster(ray_cluster):
    from pipelines.cluster import init_ray

    ctx = init_ray()
    assert not ctx.started_here


def test_the_listener_check_sees_wildcard_binds_on_ipv4_and_ipv6():
    """The check itself: 0.0.0.0 and :: count as beyond loopback, 127.0.0.1 and ::1 do not."""
    binds = [
        (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"),
        (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"),
    ]  # fmt: skip
    socks = []
    try:
        for family, host in binds:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sock.listen()
            socks.append(sock)
        ports = {s.getsockname()[1]: host for s, (_, host) in zip(socks, binds, strict=True)}
        seen = {port: addr for addr, port in listening({os.getpid()}) if port in ports}
        assert seen == ports
        assert sorted(a for a in seen.values() if a not in LOOPBACK) == ["0.0.0.0", "::"]
    finally:
        for sock in socks:
            sock.close()


def test_a_taken_dashboard_port_gives_way_to_a_free_one(caplog):
    """Two `dcm` commands on one machine: the second cluster's dashboard moves, not fails."""
    import socket

    from pipelines.cluster import _free_dashboard_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        got = _free_dashboard_port(taken)
        assert got != taken and got > 0
        assert f"port {taken} is taken" in caplog.text
    assert _free_dashboard_port(got) == got  # a free port is kept
