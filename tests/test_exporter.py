"""fedsilo.exporter: metrics served where asked, never on every address, errors in one line."""

from __future__ import annotations

import argparse
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily

from fedsilo import exporter
from fedsilo.errors import ConfigError
from tests.e2e.federation import free_port


class One:
    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("fedsilo_test_value", "A test value.", value=42.0)


def test_serves_the_collector_alone_at_metrics_and_stops() -> None:
    port = free_port()
    stop = exporter.serve(One(), "127.0.0.1", port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        stop()
    lines = [ln for ln in body.decode().splitlines() if ln and not ln.startswith("#")]
    assert lines == ["fedsilo_test_value 42.0"]  # no process or platform metrics
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize(
    "host,port,match",
    [
        ("0.0.0.0", 9000, "every address"),
        ("::", 9000, "every address"),
        ("", 9000, "is empty"),
        ("127.0.0.1", 70000, "--metrics-port"),
        ("127.0.0.1", 0, "--metrics-port"),
    ],
)
def test_bad_addresses_are_refused_with_the_fix(host: str, port: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        exporter.check_address(host, port)


def test_a_port_in_use_is_one_line_naming_the_flag() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*--metrics-port"):
            exporter.serve(One(), "127.0.0.1", port)


def test_serving_only_where_the_flags_ask() -> None:
    parser = argparse.ArgumentParser()
    exporter.add_flags(parser, "test")
    made = []

    def collector() -> One:
        made.append(1)
        return One()

    with exporter.serving(collector, exporter.address(parser.parse_args([]))):
        pass
    assert made == []  # no --metrics-port: nothing built or bound
    args = parser.parse_args(["--metrics-port", str(free_port())])
    assert exporter.address(args) == ("127.0.0.1", args.metrics_port)
    with exporter.serving(collector, exporter.address(args)):
        url = f"http://127.0.0.1:{args.metrics_port}/metrics"
        assert b"fedsilo_test_value 42.0" in urllib.request.urlopen(url, timeout=10).read()
    assert made == [1]
