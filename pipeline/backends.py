"""Which backend runs a plan's stages, and what each stage asks of it.

- ``local``: a private Ray cluster on this machine (the default).
- ``ray``: an existing Ray cluster (``--ray-address``).
- ``slurm``: one SLURM job per stage through submitit, ordered by a local Ray DAG
  (cluster/slurm_backend.py). Requests come from the grid's ``cluster:`` section.

Problems found here are the user's to fix, and are raised as ``BackendError`` before anything is
submitted.
"""
from __future__ import annotations

import ipaddress
import json
import math
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.grid import Grid
from pipeline.plan import Plan, Stage
from pipeline.spec import SlurmSpec

BACKENDS = ("local", "ray", "slurm")
MARKER = "slurm.json"


class BackendError(Exception):
    """A backend option the user must change; the message says which and how."""


def task_name(stage: Stage) -> str:
    return f"{stage.kind}:{stage.key}"


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


def slurm_params(grid: Grid, kind: str, partitions: dict[str, dict[str, Any]]):
    """The SLURM request of a ``kind`` stage: ``cluster.<kind>`` over ``cluster.default`` over the
    stage's ``resources``: its GPUs spread over ``nodes`` (gpus_per_node), one task per GPU
    (tasks_per_node = processes / nodes), its CPUs shared by the tasks (cpus_per_task).
    GPUs default to one when the chosen partition has any, else none."""
    from cluster.slurm_backend import SlurmParams

    default, own = grid.cluster.get("default", SlurmSpec()), grid.cluster.get(kind, SlurmSpec())

    def pick(name: str) -> Any:
        v = getattr(own, name)
        return v if v is not None else getattr(default, name)

    res = grid.resources[kind]
    partition = pick("partition")
    part_name = partition or next((n for n, i in partitions.items() if i["default"]), None)
    part_gpus = partitions.get(part_name or "", {}).get("gpus", 0)
    nodes = pick("nodes") or 1
    total_gpus = res.gpus if res.gpus is not None else (1 if part_gpus > 0 else 0)
    gpus = pick("gpus_per_node")
    if gpus is None:
        gpus = math.ceil(total_gpus / nodes)
    tasks = pick("tasks_per_node")
    if tasks is None:  # one task per GPU, unless resources name the processes
        tasks = math.ceil(res.processes / nodes) if res.processes else max(1, int(gpus))
    cpus = pick("cpus_per_task")
    if cpus is None:
        cpus = max(1, math.floor(res.cpus / (tasks * nodes)))
    return SlurmParams(partition=partition, nodes=nodes,
                       tasks_per_node=tasks,
                       gpus_per_node=int(gpus), cpus_per_task=int(cpus), mem_gb=pick("mem_gb"),
                       timeout_min=pick("timeout_min") or 60, account=pick("account"), qos=pick("qos"),
                       constraint=pick("constraint"), additional_parameters=dict(pick("additional_parameters") or {}),
                       setup=tuple(pick("setup") or ()), array_parallelism=pick("array_parallelism") or 64)


def slurm_backend(plan: Plan, env_vars: dict[str, str], poll_s: float = 2.0):
    """A factory for the SLURM backend of ``plan``, after checking every request against ``sinfo``;
    the factory's ``code_dir`` is the code snapshot the jobs start in."""
    from cluster.slurm_backend import SlurmBackend, SlurmConfigError, check_params, partitions

    try:
        parts = partitions()
    except (SlurmConfigError, FileNotFoundError) as err:
        raise BackendError(f"--backend slurm: cannot read the cluster's partitions ({err}). Is this a SLURM "
                           f"login node (sinfo on the PATH, SLURM_CONF set)?") from None
    params = {task_name(s): slurm_params(plan.grid, s.kind, parts) for s in plan.stages.values()}
    problems = []
    for kind in sorted({s.kind for s in plan.stages.values()}):
        p = next(v for k, v in params.items() if k.startswith(kind + ":"))
        problems += check_params(f"cluster.{kind}", p, parts)
    if problems:
        raise BackendError(f"{plan.grid.path}: " + "; ".join(problems) + ". Nothing was submitted.")
    markers = {task_name(s): s.directory(plan.grid.workdir) / MARKER for s in plan.stages.values()}
    folder = plan.grid.workdir / "slurm"

    def factory(code_dir: Path | None = None) -> SlurmBackend:
        return SlurmBackend(folder, params.__getitem__, markers.__getitem__, env_vars=env_vars, poll_s=poll_s,
                            code_dir=code_dir)

    return factory


def slurm_job(stage: Stage, workdir: Path) -> dict[str, Any] | None:
    """The stage's marker: its SLURM job id and state when it was submitted, or None."""
    f = stage.directory(workdir) / MARKER
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
