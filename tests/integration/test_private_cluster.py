"""The private local Ray cluster (the default backend) listens on loopback only (issue 11 §7)."""
from __future__ import annotations

import ipaddress

import psutil
import pytest
import ray

from cluster.ray_backend import RayBackend

pytestmark = pytest.mark.integration


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # an IPv6 socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def test_private_cluster_listens_on_loopback_only():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}  # e.g. a session's mlflow server
    with RayBackend(num_cpus=1):
        # a task, so that a worker (and its gRPC server) exists too
        node_ip = ray.get(ray.remote(ray.util.get_node_ip_address).remote())
        procs = {p.pid: p for p in me.children(recursive=True) if p.pid not in before} | {me.pid: me}
        listening = []
        for c in psutil.net_connections("tcp"):
            if c.pid in procs and c.status == psutil.CONN_LISTEN:
                listening.append((procs[c.pid].name(), c.laddr.ip, c.laddr.port))
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), listening
    exposed = [f"{name} on {ip}:{port}" for name, ip, port in listening if not _loopback(ip)]
    assert not exposed, "listening beyond loopback: " + ", ".join(exposed)
    assert node_ip == "127.0.0.1"  # what a gang's rank 0 gives as MASTER_ADDR
