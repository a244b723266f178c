"""Run callables as Ray tasks: on a private local cluster (the default) or on an existing one.

Plain ``@ray.remote`` functions that pass ObjectRefs build the DAG: Ray Workflows were removed
after Ray 2.47 and ``.bind()`` DAGs are deprecated in 2.60. A task whose argument is the ObjectRef
of a failed task is not run; Ray fails it with the upstream error. ``RayBackend`` implements the
``Backend`` protocol (cluster/backend.py); cluster/slurm_backend.py runs its DAG through one.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray

from cluster.backend import check_fits


class ConnectError(Exception):
    """The Ray cluster at the given address cannot be joined."""


class RayBackend:
    """Tasks on a private local Ray cluster (``address`` None: started on enter, stopped on exit) or
    on the running cluster at ``address`` (joined, then left running)."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
                 env_vars: dict[str, str] | None = None, code_dir: str | os.PathLike | None = None):
        """``code_dir``: a folder whose packages the workers import instead of the driver's (Ray's
        ``working_dir``: uploaded once per content hash, to every node of a joined cluster too)."""
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.env_vars = env_vars or {}
        self.code_dir = code_dir
        self._remote: dict[Callable, Any] = {}

    def __enter__(self) -> RayBackend:
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=True,
                                      logging_level="ERROR", runtime_env={"env_vars": self.env_vars})
        if self.code_dir is not None:
            kwargs["runtime_env"]["working_dir"] = str(self.code_dir)
        if self.address is None:
            # "local" always starts a private cluster; a bare ray.init() may join one already running
            kwargs.update(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        else:
            kwargs.pop("include_dashboard")
            kwargs["address"] = self.address
        try:
            with _loopback_node(self.address is None), _keep_signal_handlers():
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as err:
            hint, chain, e = "", [], err
            while e is not None:  # Ray puts the authentication error in the cause
                chain.append(str(e).lower())
                e = e.__cause__ or e.__context__
            if any("auth" in text or "token" in text for text in chain):
                hint = (" The cluster uses token authentication: export RAY_AUTH_MODE=token and the cluster's "
                        "token (RAY_AUTH_TOKEN, or ~/.ray/auth_token on this machine).")
            raise ConnectError(f"cannot join the Ray cluster at {self.address}: {str(err).splitlines()[-1]}.{hint}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        ray.shutdown()  # stops a cluster we started; only disconnects from one we joined

    def resources(self) -> dict[str, float]:
        return dict(ray.cluster_resources())

    @staticmethod
    def hosts() -> set[str]:
        """The addresses of the cluster's live nodes."""
        return {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}

    def check_fits(self, label: str, cpus: float, gpus: float) -> None:
        """Raises ResourceError when the whole cluster has fewer CPUs or GPUs than one task asks for."""
        check_fits(label, cpus, gpus, self.resources(), "the Ray cluster")

    def submit(self, fn: Callable, args: Sequence[Any], *, name: str, cpus: float, gpus: float,
               retries: int = 0, processes: int = 1) -> ray.ObjectRef:
        """One task, or with ``processes`` > 1 a gang of that many (see ``_gang``), each with
        ``cpus``/``gpus``; the ObjectRef gives rank 0's return value."""
        if processes > 1:
            if _gang not in self._remote:
                self._remote[_gang] = ray.remote(_gang)
            return self._remote[_gang].options(num_cpus=0, name=name, max_retries=retries,
                                               retry_exceptions=False).remote(fn, processes, cpus, gpus, name, *args)
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        return self._remote[fn].options(num_cpus=cpus, num_gpus=gpus, name=name, max_retries=retries,
                                        retry_exceptions=False).remote(*args)

    @staticmethod
    def wait(refs: list, timeout: float) -> tuple[list, list]:
        if not refs:
            return [], []
        return ray.wait(refs, num_returns=len(refs), timeout=timeout)

    @staticmethod
    def outcome(ref: ray.ObjectRef) -> tuple[bool, Any]:
        """(True, value) or (False, the exception)."""
        try:
            return True, ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the task's own exception, without Ray's wrapper
            return False, err.cause if isinstance(err.cause, Exception) else err
        except Exception as err:  # WorkerCrashedError etc.
            return False, err


@contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """The caller's SIGTERM, SIGHUP and SIGINT handlers, put back after ``ray.init``. Ray's core
    worker installs its own (absl's failure handler logs "SIGTERM received" and aborts), so a
    driver stopped by ``timeout``, ``scancel`` or ``kill`` would die without running its cleanup."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextmanager
def _loopback_node(private: bool) -> Iterator[None]:
    """While a private cluster starts, make its node address 127.0.0.1, so that GCS, raylet, object
    manager, agents and every worker listen on loopback only; nobody else can join or call it.

    Ray 2.60 binds its gRPC servers to the wildcard address unless the node address is loopback,
    and ``ray.init(_node_ip_address="127.0.0.1")`` (like ``ray start --node-ip-address``) turns
    loopback back into the machine's address (``services.resolve_ip_for_localhost``). The one way
    in is the switch Ray uses on macOS and Windows: with ``ENABLE_RAY_CLUSTER`` false,
    ``services.get_node_ip_address`` answers loopback. Scoped to ``ray.init``; joining a cluster
    (``--ray-address``) leaves it alone. tests/integration/test_private_cluster.py checks the sockets."""
    from ray._private import ray_constants

    if not private or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _probe_master() -> tuple[str, int]:
    """This node's address and a port that is free on it now, for rank 0's rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _rank(fn: Callable, env: dict[str, str], *args: Any) -> Any:
    os.environ.update(env)
    return fn(*args)


def _gang(fn: Callable, processes: int, cpus: float, gpus: float, name: str, *args: Any) -> Any:
    """Run ``fn`` in ``processes`` tasks that can join one torch.distributed group (env://).

    A placement group reserves all of them at once, so two gangs can never each hold half of the
    cluster and wait on each other. Rank 0's bundle is probed first for its node's address and a
    free port (MASTER_ADDR, MASTER_PORT); every rank gets RANK and WORLD_SIZE, and LOCAL_RANK 0
    because Ray gives each task its own CUDA_VISIBLE_DEVICES. Waits with zero CPUs."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
    pg = placement_group([bundle] * processes, strategy="PACK", name=name)
    ray.get(pg.ready())
    try:
        def on(i: int, **opts: Any) -> dict:
            return dict(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                        max_retries=0, **opts)
        addr, port = ray.get(ray.remote(_probe_master).options(**on(0, num_cpus=0)).remote())
        refs = []
        for r in range(processes):
            env = {"RANK": str(r), "WORLD_SIZE": str(processes), "LOCAL_RANK": "0",
                   "MASTER_ADDR": addr, "MASTER_PORT": str(port)}
            refs.append(ray.remote(_rank).options(**on(r, num_cpus=cpus, num_gpus=gpus), name=f"{name}#{r}")
                        .remote(fn, env, *args))
        return ray.get(refs)[0]
    finally:
        remove_placement_group(pg)


def local_env() -> dict[str, str]:
    """Environment a worker needs to see what the driver sees."""
    keep = ("SSLGRID_CACHE", "MLFLOW_TRACKING_URI", "PYTHONPATH", "SLURM_CONF", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
    return {k: os.environ[k] for k in keep if k in os.environ}
