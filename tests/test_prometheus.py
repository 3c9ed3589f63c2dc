"""Metrics of a distributed run, as Prometheus sees them.

Real servers on loopback: Redis (db 15), a throwaway PostgreSQL database, `smartpush worker` processes
with `--metrics-port`, `smartpush serve`, and a real Prometheus server (Debian's `prometheus`) scraping
both every second. The run's counts must reach Prometheus from every worker process, Dramatiq's own
metrics beside smartpush's, and no phone number anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from conftest import smartpush_exe
from prometheus_client.parser import text_string_to_metric_families
from servers import flushed_redis, needs_services, throwaway_database

from smartpush.ledger import Ledger, RunState, Status
from smartpush.testing import FakeProviderServer

REDIS_DB = 15
PROMETHEUS = shutil.which("prometheus")


pytestmark = needs_services(REDIS_DB)


@pytest.fixture
def database() -> Iterator[str]:
    with throwaway_database("sp_prom") as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    with flushed_redis(REDIS_DB) as url:
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """Commands started in sessions of their own, logged to files, stopped with SIGTERM (then KILL all)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str | None]) -> subprocess.Popen[bytes]:
        """``env`` is added to this process's environment; a None value removes the variable."""
        log = (self.folder / f"{name}.log").open("wb")
        full = {**os.environ, **env}
        proc = subprocess.Popen(
            args,
            cwd=self.folder,
            env={k: v for k, v in full.items() if v is not None},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append((proc, log))
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.folder.glob("*.log"))
        )

    def stop_all(self) -> None:
        for proc, _ in self.procs:  # the main process only, as systemd does: it stops its children
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, procs: Processes) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n{procs.logs()}")


def get(url: str) -> str | None:
    try:
        answer = httpx.get(url, timeout=3)
    except httpx.TransportError:
        return None
    return answer.text if answer.status_code == 200 else None


def make_project(
    tmp_path: Path, rows: int, server: FakeProviderServer, redis_url: str, database: str
) -> Path:
    config = tmp_path / "smartpush.yaml"
    config.write_text(
        f"broker: {redis_url}\ndatabase: {database}\n"
        f"providers:\n  sms:\n    type: webhook\n    sender: MAIRIE\n    base_url: {server.url}\n"
        "    concurrency: 20\n",
        encoding="utf-8",
    )
    (tmp_path / "people.csv").write_text(
        "id;phone\n" + "".join(f"{i};061{i:07d}\n" for i in range(rows)), encoding="utf-8"
    )
    (tmp_path / "c.yaml").write_text(
        "name: alerte-metriques\ncategory: service\naudience: {source: people.csv, id: id}\n"
        "segments: {size: 25}\nchannels:\n  - {channel: sms, provider: sms, body: Alerte test.}\n",
        encoding="utf-8",
    )
    return config


def launch(tmp_path: Path, env: dict[str, str | None]) -> str:
    full = {**os.environ, **env}
    launched = subprocess.run(
        [smartpush_exe(), "send", "c.yaml", "--yes", "--detach", "--json"],
        cwd=tmp_path,
        env={k: v for k, v in full.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert launched.returncode == 0, launched.stderr
    return str(json.loads(launched.stdout)["run_id"])


def wait_finished(database: str, run_id: str, procs: Processes) -> None:
    ledger = Ledger(database)
    try:

        def finished() -> bool:
            run = ledger.get_run(run_id)
            return run is not None and run.state is RunState.FINISHED

        wait_for(finished, 120, "the run to finish", procs)
        assert set(ledger.counts(run_id)) == {("sms", Status.SENT)}
    finally:
        ledger.close()


def values(text: str, name: str, **match: str) -> list[float]:
    """The exposition's samples called ``name`` whose labels include ``match``."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items())
    ]


def test_the_worker_metrics_port_shows_every_process(
    tmp_path: Path, database: str, redis_url: str, processes: Processes
) -> None:
    """`--metrics-port` alone: a private multiprocess folder, removed when the worker stops."""
    rows = 200
    port = free_port()
    before = set(Path(tempfile.gettempdir()).glob("smartpush-metrics-*"))
    env: dict[str, str | None] = {"dramatiq_prom_host": "127.0.0.1"}
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "dramatiq_prom_db"):
        env[name] = None  # the port alone is enough
    with FakeProviderServer(delay_s=0.005) as server:
        config = make_project(tmp_path, rows, server, redis_url, database)
        args = ["worker", "--config", str(config), "--processes", "2", "--threads", "2"]
        worker = processes.start("worker", [smartpush_exe(), *args, "--metrics-port", str(port)], env)
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: get(url), 60, "the worker's metrics port", processes)
        run_id = launch(tmp_path, {})
        wait_finished(database, run_id, processes)

        def complete() -> str | None:
            text = get(url) or ""
            counted = sum(values(text, "smartpush_messages_total", status="sent"))
            live = values(text, "smartpush_run_messages", run=run_id, status="sent")  # read every 2 s
            return text if counted == rows and live == [rows] else None

        text = wait_for(complete, 30, f"{rows} sent messages on {url}", processes)
    assert sum(values(text, "smartpush_provider_requests_total", provider="sms", outcome="ok")) == rows
    assert (
        sum(values(text, "smartpush_provider_latency_seconds_count", provider="sms", channel="sms")) == rows
    )
    assert sum(values(text, "smartpush_time_to_provider_seconds_count", channel="sms")) == rows
    assert sum(values(text, "smartpush_sms_parts_total", provider="sms", encoding="GSM-7")) == rows
    # Dramatiq's own metrics, from the same folder: every segment went through an actor.
    assert sum(values(text, "dramatiq_messages_total")) >= rows / 25
    # The live gauges: the run (just finished) by status, the queues by state.
    assert values(text, "smartpush_run_messages", run=run_id, status="sent") == [rows]
    assert values(text, "smartpush_run_messages", run=run_id, status="created") == [0]
    assert len(values(text, "smartpush_queue_messages")) == 6
    assert values(text, "smartpush_queue_messages", queue="smartpush-normal", state="waiting") == [0]
    # Names, labels and help texts, not the sampled values: a float such as 223.4911000000003 holds
    # "10000000" without being anyone's phone number.
    shown = "\n".join(line if line.startswith("#") else line.rsplit(" ", 1)[0] for line in text.splitlines())
    for i in range(rows):
        assert f"1{i:07d}" not in shown  # no phone number, in any form
    processes.stop_all()
    assert worker.returncode == 0, processes.logs()
    assert set(Path(tempfile.gettempdir()).glob("smartpush-metrics-*")) == before  # removed at exit


@pytest.mark.skipif(PROMETHEUS is None, reason="needs the prometheus binary (apt-get install prometheus)")
def test_prometheus_scrapes_workers_and_serve(
    tmp_path: Path, database: str, redis_url: str, processes: Processes
) -> None:
    assert PROMETHEUS is not None
    rows = 120
    folder = tmp_path / "prom"  # shared by the worker, serve and the launching `send` (SPEC "Metrics")
    worker_port, serve_port, prometheus_port = free_port(), free_port(), free_port()
    env: dict[str, str | None] = {
        "PROMETHEUS_MULTIPROC_DIR": str(folder),
        "dramatiq_prom_host": "127.0.0.1",
        "dramatiq_prom_db": None,
    }
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: smartpush-worker\n    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n"
        f"  - job_name: smartpush-serve\n    static_configs: [{{targets: ['127.0.0.1:{serve_port}']}}]\n",
        encoding="utf-8",
    )
    api = f"http://127.0.0.1:{prometheus_port}"

    def query(expr: str) -> list[dict[str, Any]]:
        try:
            answer = httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=5)
        except httpx.TransportError:
            return []
        body = answer.json()
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scalar(expr: str) -> float | None:
        found = query(expr)
        return float(found[0]["value"][1]) if found else None

    with FakeProviderServer(delay_s=0.005) as server:
        config = make_project(tmp_path, rows, server, redis_url, database)
        args = ["worker", "--config", str(config), "--processes", "2", "--threads", "2"]
        processes.start("worker", [smartpush_exe(), *args, "--metrics-port", str(worker_port)], env)
        wait_for(lambda: get(f"http://127.0.0.1:{worker_port}/metrics"), 60, "the worker", processes)
        serve = [smartpush_exe(), "serve", "--config", str(config), "--port", str(serve_port)]
        processes.start("serve", serve, env)
        wait_for(lambda: get(f"http://127.0.0.1:{serve_port}/healthz"), 60, "serve", processes)
        processes.start(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            {},
        )
        wait_for(lambda: get(f"{api}/-/ready"), 60, "Prometheus", processes)
        run_id = launch(tmp_path, env)  # the launch counts what it stores, in the shared folder
        wait_finished(database, run_id, processes)

        def sent(job: str) -> bool:
            expr = f'sum(smartpush_messages_total{{job="{job}",status="sent"}})'
            return scalar(expr) == rows

        wait_for(lambda: sent("smartpush-worker"), 60, "the sent messages in Prometheus", processes)
    # Both targets up; serve's /metrics reads the same folder: the host's whole picture.
    # (`up` is the last scrape's: a loaded machine may miss the 1 s scrape timeout now and then.)
    wait_for(lambda: scalar('sum(up{job=~"smartpush-.*"})') == 2, 30, "both targets up", processes)
    wait_for(lambda: sent("smartpush-serve"), 30, "the sent messages through serve", processes)
    assert scalar('sum(smartpush_messages_total{job="smartpush-worker",status="created"})') == rows
    assert scalar('sum(smartpush_provider_requests_total{job="smartpush-worker",outcome="ok"})') == rows
    # Dramatiq's own counters, beside smartpush's.
    dramatiq = scalar('sum(dramatiq_messages_total{job="smartpush-worker"})')
    assert dramatiq is not None and dramatiq >= rows / 25
    assert query('dramatiq_message_duration_milliseconds_count{job="smartpush-worker"}')
    # The live gauges.
    assert scalar(f'max(smartpush_run_messages{{run="{run_id}",status="sent"}})') == rows
    assert len(query('smartpush_queue_messages{job="smartpush-worker"}')) == 6
    # No personal data in any series Prometheus stored.
    series = httpx.get(f"{api}/api/v1/series", params={"match[]": '{job=~"smartpush-.*"}'}, timeout=10).json()
    labels = json.dumps(series["data"])
    assert "smartpush_messages_total" in labels
    for i in range(rows):
        assert f"1{i:07d}" not in labels
