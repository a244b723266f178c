"""Which backend runs a plan's stages, and whether the machines it runs them on can reach the
tracking store.

- ``local``: a private Ray cluster on this machine (the default).
- ``ray``: an existing Ray cluster (``--ray-address``).
- ``slurm``: one SLURM job per stage through submitit, ordered by a local Ray DAG
  (pipeline/slurm.py, cluster/slurm_backend.py). Requests come from the grid's ``cluster:`` section.

Each implements the ``Backend`` protocol of cluster/backend.py. Problems found here are the user's
to fix, and are raised as ``BackendError`` before anything is submitted.
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

BACKENDS = ("local", "ray", "slurm")


class BackendError(Exception):
    """A backend option the user must change; the message says which and how."""


def remote_tracking_problem(uri: str, where: str) -> str | None:
    """Compute nodes log to the tracking store themselves; a SQLite file on this disk is not theirs.
    ``where`` says which machines, e.g. "--backend slurm runs stages on other machines"."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (f"{where}, which cannot write to {uri}. "
            f"Fix: start a tracking server that they can reach (`sslgrid server --host 0.0.0.0`, see "
            f"the README) and pass its address with --tracking-uri http://<this host>:5000.")


def is_loopback_host(host: str) -> bool:
    """``host`` (a name or an address, IPv6 with or without brackets) means "this machine" wherever
    it is used: localhost, 127.0.0.0/8, ::1, ::ffff:127.x, or the wildcard 0.0.0.0 / :: that clients
    treat as this machine. Names are not resolved: a head node's own name often maps to 127.0.1.1 in
    its /etc/hosts while compute nodes resolve it properly."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        try:  # the forms inet_aton takes too: 127.1, 0, 2130706433
            addr = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_unspecified


def loopback_tracking_warning(uri: str, where: str) -> str | None:
    """A warning, or None, for an http(s) tracking URI that names this machine's loopback: jobs on
    other nodes would log to themselves and fail; jobs on this node (a one-node cluster) succeed,
    so this warns and does not refuse. ``where`` as in ``remote_tracking_problem``."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname or not is_loopback_host(parts.hostname):
        return None
    port = f" --port {parts.port}" if parts.port else ""
    return (f"{where}, which cannot reach {uri}: it is this machine's loopback address, so only stages "
            f"that run on this machine can log to it. Fix: serve it with `sslgrid server --host 0.0.0.0{port}` "
            f"and pass the --tracking-uri that it prints.")


def advertised_host(bind: str) -> str:
    """The address to give compute nodes for a server bound to ``bind``: ``bind`` itself, or for the
    wildcard (0.0.0.0, ::) this machine's address on its default route (as Ray finds a node's
    address), else a non-loopback address its name resolves to (IPv4 first), else its name, else
    "<this host>". Never a loopback address."""
    if bind.strip("[]") not in ("0.0.0.0", "::"):
        return bind
    families = (socket.AF_INET6, socket.AF_INET) if ":" in bind else (socket.AF_INET,)
    for family in families:
        ip = _default_route_ip(family)
        if ip and not is_loopback_host(ip):
            return ip
    name = socket.gethostname()
    try:
        resolved = {a[4][0] for a in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)}
    except OSError:
        resolved = set()
    ips = sorted((ip for ip in resolved if not is_loopback_host(ip)
                  and not ipaddress.ip_address(ip.split("%")[0]).is_link_local), key=lambda ip: (":" in ip, ip))
    if ips:
        return ips[0]
    return name if name and not is_loopback_host(name) else "<this host>"


def _default_route_ip(family: socket.AddressFamily) -> str | None:
    """The source address the kernel picks towards a public address; connecting a UDP socket sends
    nothing. None without a route."""
    probe = "2001:4860:4860::8888" if family == socket.AF_INET6 else "8.8.8.8"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 80))
            return s.getsockname()[0]
    except OSError:
        return None


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
