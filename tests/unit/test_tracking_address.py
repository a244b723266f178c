"""Tracking addresses that compute nodes can use (issue 11 §7): what ``sslgrid server`` prints, and
the warning for a loopback tracking URI on a backend that runs stages on other machines."""
from __future__ import annotations

import io
import socket

import pytest
from rich.console import Console

import pipeline.backends as backends
from pipeline import cli
from pipeline.backends import advertised_host, is_loopback_host, loopback_tracking_warning

WHERE = "--backend slurm runs stages on other machines"


@pytest.mark.parametrize("uri", [
    "http://127.0.0.1:5000", "http://127.8.9.10:5000", "http://localhost:5000", "https://LOCALHOST/",
    "http://app.localhost:5000", "http://[::1]:5000", "http://[::ffff:127.0.0.1]:5000", "http://0.0.0.0:5000",
    "http://[::]:5000", "http://127.1:5000", "http://2130706433:5000", "http://0:5000",
])
def test_a_loopback_tracking_uri_is_warned_about(uri):
    text = loopback_tracking_warning(uri, WHERE)
    assert text == (f"{WHERE}, which cannot reach {uri}: it is this machine's loopback address, so only stages "
                    f"that run on this machine can log to it. Fix: serve it with `sslgrid server --host 0.0.0.0"
                    f"{' --port 5000' if ':5000' in uri else ''}` and pass the --tracking-uri that it prints.")


@pytest.mark.parametrize("uri", [
    "http://head:5000", "http://head.cluster.example:5000", "http://10.0.0.1:5000", "https://[fd00::2]:443",
    "http://localhost.example.org:5000", "http://128.0.0.1:5000", "sqlite:////shared/mlflow.db", "databricks",
])
def test_a_reachable_or_non_http_tracking_uri_is_not_warned_about(uri):
    assert loopback_tracking_warning(uri, WHERE) is None


def test_names_are_not_resolved():
    """A head node's own name often maps to 127.0.1.1 in its /etc/hosts; compute nodes resolve it properly."""
    assert not is_loopback_host(socket.gethostname()) or socket.gethostname() == "localhost"


def test_a_server_bound_to_one_address_is_advertised_at_it():
    for host in ("127.0.0.1", "10.1.2.3", "head.cluster.example", "fd00::2"):
        assert advertised_host(host) == host


def test_a_wildcard_server_is_advertised_at_a_reachable_address():
    for bind in ("0.0.0.0", "::"):
        host = advertised_host(bind)
        assert not is_loopback_host(host), host


def test_wildcard_fallbacks_without_a_route(monkeypatch):
    monkeypatch.setattr(backends, "_default_route_ip", lambda family: None)
    monkeypatch.setattr(socket, "gethostname", lambda: "login1")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, 1, 6, "", ("127.0.1.1", 0)), (socket.AF_INET6, 1, 6, "", ("fe80::1%eth0", 0, 0, 2)),
        (socket.AF_INET6, 1, 6, "", ("2001:db8::7", 0, 0, 0)), (socket.AF_INET, 1, 6, "", ("10.4.0.7", 0))])
    assert advertised_host("0.0.0.0") == "10.4.0.7"
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, 1, 6, "", ("127.0.1.1", 0))])
    assert advertised_host("0.0.0.0") == "login1"
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    assert advertised_host("0.0.0.0") == "<this host>"


def _server_output(monkeypatch, *argv: str) -> tuple[str, list[str]]:
    ran = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **kwargs: ran.append(cmd) or 0)
    out = io.StringIO()
    args = cli.parser().parse_args(["server", "--port", "5123", *argv])
    assert cli.cmd_server(args, Console(file=out, width=400)) == 0
    return out.getvalue(), ran[0]


def test_server_on_every_interface_prints_an_address_nodes_can_reach(monkeypatch):
    monkeypatch.setattr(backends, "_default_route_ip", lambda family: "10.4.0.7" if family == socket.AF_INET else None)
    text, cmd = _server_output(monkeypatch, "--host", "0.0.0.0")
    assert "use it with: sslgrid run GRID --tracking-uri http://10.4.0.7:5123\n" in text
    assert "nodes that know it by another address or name than 10.4.0.7 can use that instead" in text
    assert "127.0.0.1" not in text
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"


def test_server_on_ipv6_wildcard_brackets_the_address(monkeypatch):
    monkeypatch.setattr(backends, "_default_route_ip", lambda family: "fd00::2" if family == socket.AF_INET6 else None)
    text, _ = _server_output(monkeypatch, "--host", "::")
    assert "--tracking-uri http://[fd00::2]:5123\n" in text


def test_server_on_one_address_prints_it(monkeypatch):
    text, _ = _server_output(monkeypatch, "--host", "10.1.2.3")
    assert "use it with: sslgrid run GRID --tracking-uri http://10.1.2.3:5123\n" in text
    text, _ = _server_output(monkeypatch)
    assert "use it with: sslgrid run GRID --tracking-uri http://127.0.0.1:5123\n" in text
    assert "every address" not in text
