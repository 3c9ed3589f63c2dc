"""What every scenario of ``python -m bench`` shares: a throwaway project, the sinks, the worker processes
and the measures taken around a run.

- :class:`Project`: a temporary folder, a PostgreSQL database ``sp_bench_xxxxxx`` created for it and
  dropped afterwards, and Redis **db 10** emptied before and after (FLUSHDB of that one database only).
- :class:`HttpSink` (bench/sink.py) and :class:`SmtpSink` (bench/smtp_sink.py): subprocesses on loopback
  that count what they receive, so a run that lost messages says so.
- :class:`Meter`: wall time, CPU of the smartpush processes (``wait4`` rusage of a finished command plus
  ``/proc`` samples of the worker process group), CPU of the Redis and PostgreSQL servers (``/proc``,
  server-wide), peak RSS per process (``ru_maxrss`` / ``VmHWM``), Redis commands (``INFO stats``
  ``total_commands_processed``, server-wide) and PostgreSQL transactions and rows written
  (``pg_stat_database`` of the bench database).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import redis

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SMARTPUSH = BIN / "smartpush"
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 10
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
#: Dramatiq's namespace in smartpush.queueing.make_broker; each consuming broker heartbeats there.
HEARTBEATS = "smartpush:__heartbeats__"
TICKS = os.sysconf("SC_CLK_TCK")
#: Worker logs are kept here (the project folder goes when the scenario ends).
LOGS = Path(tempfile.gettempdir()) / "smartpush-bench-logs"
#: How often the worker tree is sampled (CPU and VmHWM) while a run goes on.
SAMPLE_EVERY_S = 0.5


class BenchError(RuntimeError):
    """A scenario could not run; the message says why."""


def log(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


# -- the project: folder, database, Redis db 10 --------------------------------------------------------


class Project:
    """A temp folder with a smartpush.yaml, its own PostgreSQL database, Redis db 10 flushed around it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.db_name = f"sp_bench_{secrets.token_hex(3)}"
        self.db_url = f"{PG}/{self.db_name}"
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
        self.config = self.root / "smartpush.yaml"

    def __enter__(self) -> Project:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.db_name}")
        flush_redis()
        return self

    def __exit__(self, *exc: object) -> None:
        flush_redis()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")
        shutil.rmtree(self.root, ignore_errors=True)

    def write_config(self, providers: str, extra: str = "") -> Path:
        """smartpush.yaml with the bench broker and database; ``providers`` is the indented YAML body."""
        self.config.write_text(
            f"broker: {REDIS_URL}\ndatabase: {self.db_url}\nregion: FR\n{extra}providers:\n{providers}",
            encoding="utf-8",
        )
        return self.config


def flush_redis() -> None:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        client.flushdb()  # db 10 only: never FLUSHALL, other engineers use the other databases
    finally:
        client.close()


# -- sinks ------------------------------------------------------------------------------------------


class HttpSink:
    """bench/sink.py in a subprocess; ``count()`` is the number of messages it has received."""

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "sink.py"), "--delay-ms", str(delay_ms)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """The sink process's CPU seconds so far (it shares the machine's cores with smartpush)."""
        stat = _stat(self.proc.pid)
        return stat[3] if stat else 0.0

    def count(self) -> int:
        with urllib.request.urlopen(f"{self.url}/__count", timeout=10) as answer:
            return int(json.loads(answer.read())["count"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class SmtpSink:
    """bench/smtp_sink.py (aiosmtpd) in a subprocess; ``count()`` is the number of messages accepted."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "smtp_sink.py")], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.port, self.count_port = (int(p) for p in self.proc.stdout.readline().split())

    def cpu_s(self) -> float:
        """The sink process's CPU seconds so far (it shares the machine's cores with smartpush)."""
        stat = _stat(self.proc.pid)
        return stat[3] if stat else 0.0

    def count(self) -> int:
        with socket.create_connection(("127.0.0.1", self.count_port), timeout=10) as sock:
            return int(sock.makefile().readline())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- /proc ------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int, float, float] | None:
    """(comm, ppid, pgid, own CPU s, reaped children's CPU s) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, pgrp 5, utime 14, stime 15, cutime 16, cstime 17
    own = (int(rest[11]) + int(rest[12])) / TICKS
    children = (int(rest[13]) + int(rest[14])) / TICKS
    return comm, int(rest[1]), int(rest[2]), own, children


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def group_sample(pgid: int) -> dict[int, tuple[float, float]]:
    """CPU seconds and peak RSS MiB of every live process of process group ``pgid``."""
    found = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None and stat[2] == pgid:
            found[pid] = (stat[3], vm_hwm_mib(pid))
    return found


def server_pids() -> tuple[int, int]:
    """(redis-server's pid, the postmaster's pid) of the servers the bench uses (not other instances)."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        redis_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    with psycopg.connect(f"{PG}/postgres") as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    backend = _stat(int(row[0])) if row else None
    return redis_pid, backend[1] if backend else 0


def server_cpu_s(pids: tuple[int, int]) -> float:
    """CPU seconds used so far by redis-server and PostgreSQL: the postmaster, its live children and,
    through its children's times, those that exited. Server-wide: other users of the servers count."""
    redis_pid, postmaster = pids
    total = 0.0
    for pid in _pids():
        stat = _stat(pid)
        if stat is None:
            continue
        if pid == redis_pid or stat[1] == postmaster:
            total += stat[3]
        elif pid == postmaster:
            total += stat[3] + stat[4]
    return total


class GroupSampler(threading.Thread):
    """Samples a process group (a worker and its forked processes) until stopped: per process the last
    CPU seen and its VmHWM, so processes that exit between samples still count (to the last sample)."""

    def __init__(self, pgid: int) -> None:
        super().__init__(daemon=True, name=f"sampler-{pgid}")
        self.pgid = pgid
        self.seen: dict[int, tuple[float, float]] = {}
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> dict[int, tuple[float, float]]:
        now = group_sample(self.pgid)
        with self._lock:
            self.seen.update(now)
            return dict(self.seen)

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_EVERY_S):
            self.sample()

    def stop(self) -> dict[int, tuple[float, float]]:
        self._stop_event.set()
        return self.sample()


# -- counters ---------------------------------------------------------------------------------------


def redis_commands() -> int:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def pg_counters(db_name: str) -> tuple[int, int]:
    """(transactions, rows inserted + updated + deleted) of one database, as pg_stat_database has them."""
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit + xact_rollback, tup_inserted + tup_updated + tup_deleted "
            "FROM pg_stat_database WHERE datname = %s",
            (db_name,),
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# -- a measured run ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the output table."""

    scenario: str
    messages: int
    wall_s: float
    cpu_s: float | None = None  # smartpush processes
    server_cpu_s: float | None = None  # redis-server + postgres
    peak_rss_mib: float | None = None
    redis_ops: int | None = None
    pg_xacts: int | None = None
    pg_rows: int | None = None
    baseline: str = ""
    baseline_rate: float | None = None
    notes: list[str] = field(default_factory=list)
    ok: bool = True
    #: On a peer's row: smartpush's rate over this peer's.
    peer_ratio: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0

    def per_message(self, value: float | None, scale: float = 1.0) -> str:
        if value is None or not self.messages:
            return "—"
        return (
            f"{value * scale / self.messages:,.2f}"
            if scale == 1.0
            else f"{value * scale / self.messages:,.0f}"
        )

    def cells(self) -> list[str]:
        ratio = f"{self.rate / self.baseline_rate:.2f}" if self.baseline_rate else "—"
        if self.peer_ratio is not None:
            ratio = f"smartpush {self.peer_ratio:.2f}×"
        baseline = (
            f"{self.baseline} {self.baseline_rate:,.0f}/s" if self.baseline_rate else (self.baseline or "—")
        )
        return [
            self.scenario
            + ("" if self.ok else " **(FAILED)**" if not self.wall_s else " **(LOST MESSAGES)**"),
            f"{self.messages:,}",
            f"{self.wall_s:.2f}",
            f"{self.rate:,.0f}",
            self.per_message(self.cpu_s, 1e6),
            self.per_message(self.server_cpu_s, 1e6),
            f"{self.peak_rss_mib:.0f}" if self.peak_rss_mib is not None else "—",
            self.per_message(self.redis_ops),
            self.per_message(self.pg_xacts),
            self.per_message(self.pg_rows),
            baseline,
            ratio,
        ]


HEADER = [
    "scenario",
    "messages",
    "wall s",
    "msg/s",
    "CPU µs/msg smartpush",
    "CPU µs/msg redis+pg",
    "peak RSS MiB (largest process)",
    "Redis ops/msg",
    "PG xacts/msg",
    "PG rows/msg",
    "baseline",
    "ratio",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| --- |" + " ---: |" * (len(HEADER) - 3) + " --- | ---: |"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


class Meter:
    """Counters read at ``start()`` and ``stop()``: wall, server CPU, Redis commands, PostgreSQL stats."""

    def __init__(self, db_name: str | None) -> None:
        self.db_name = db_name
        self.own_queries = 0  # transactions the bench itself ran in the bench database, taken out
        self.pg_delta: tuple[int, int] | None = None

    def start(self) -> None:
        self.redis0 = redis_commands()
        self.pg0 = pg_counters(self.db_name) if self.db_name else (0, 0)
        self.servers = server_pids()
        self.server0 = server_cpu_s(self.servers)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        self.wall_s = time.perf_counter() - self.t0
        self.server_s = server_cpu_s(self.servers) - self.server0
        self.redis_ops = redis_commands() - self.redis0 - 1  # our own INFO
        return self.wall_s

    def pg_after(self) -> tuple[int, int] | None:
        """Read once the smartpush processes are gone (a backend reports its counts when it ends)."""
        if self.pg_delta is None and self.db_name:
            time.sleep(1.2)  # PostgreSQL 15 flushes backend statistics at most once a second
            xacts, rows = pg_counters(self.db_name)
            self.pg_delta = (xacts - self.pg0[0] - self.own_queries, rows - self.pg0[1])
        return self.pg_delta

    def fill(self, row: Row) -> Row:
        row.server_cpu_s = self.server_s
        row.redis_ops = self.redis_ops
        delta = self.pg_after()
        if delta is not None:
            row.pg_xacts, row.pg_rows = delta
        return row


# -- smartpush processes ----------------------------------------------------------------------------


@dataclass
class Finished:
    """A command run to its end: wall, exit code, CPU (its tree, reaped) and peak RSS."""

    wall_s: float
    code: int
    cpu_s: float
    peak_rss_mib: float
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The command's --json answer, else a BenchError with what it printed on standard error."""
        try:
            document = json.loads(self.stdout)
        except ValueError:
            document = None
        if not isinstance(document, dict) or self.code not in (0, 3):
            raise BenchError(f"exit {self.code}, no JSON answer:\n{self.stderr[-3000:]}{self.stdout[-2000:]}")
        return document


#: GNU time: starts the measured command from a process of a few MB. Linux reports as a child's peak
#: RSS at least what its parent held when it forked, so a command started straight from this harness
#: (which holds audiences and results: 200 MB and more) would show the harness's memory, not its own.
GNU_TIME = Path("/usr/bin/time")


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> Finished:
    """Run ``cmd`` to its end; ``wait4`` gives its CPU and peak RSS (children it reaped included).

    Through GNU time when installed (peak RSS of the command itself, see :data:`GNU_TIME`)."""
    args = [str(c) for c in cmd]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile() as rss,
    ):
        if GNU_TIME.exists():
            args = [str(GNU_TIME), "-q", "-f", "%M", "-o", rss.name, *args]
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
        peak_mib = usage.ru_maxrss / 1024
        if GNU_TIME.exists():
            with contextlib.suppress(ValueError, IndexError):
                peak_mib = int(Path(rss.name).read_text().split()[-1]) / 1024  # kilobytes
    if proc.returncode not in (0, 1, 3):
        raise BenchError(f"{' '.join(map(str, cmd[:3]))} exited {proc.returncode}:\n{stderr[-3000:]}")
    return Finished(wall, proc.returncode, usage.ru_utime + usage.ru_stime, peak_mib, stdout, stderr)


class Workers:
    """``smartpush worker --processes P --threads T`` in its own process group, sampled while it runs."""

    def __init__(self, project: Project, processes: int, threads: int) -> None:
        self.processes = processes
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{project.label}-{project.db_name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                str(SMARTPUSH),
                "worker",
                "--config",
                str(project.config),
                "--processes",
                str(processes),
                "--threads",
                str(threads),
            ],
            cwd=project.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.sampler = GroupSampler(self.proc.pid)
        self.profiler: subprocess.Popen[bytes] | None = None

    def wait_consuming(self, timeout_s: float = 90.0) -> None:
        """Until each worker process's broker has fetched from Redis (its heartbeat is there)."""
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        deadline = time.monotonic() + timeout_s
        try:
            while int(client.zcard(HEARTBEATS)) < self.processes:
                if self.proc.poll() is not None:
                    raise BenchError(f"the worker exited with {self.proc.returncode}:\n{self.tail()}")
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"the workers were not consuming after {timeout_s:.0f} s:\n{self.tail()}"
                    )
                time.sleep(0.1)
        finally:
            client.close()
        self.cpu0 = sum(cpu for cpu, _ in group_sample(self.proc.pid).values())
        self.sampler.start()

    def profile(self, path: Path) -> None:
        """py-spy on the worker and its forked processes until they exit."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler = subprocess.Popen(
            [
                *(
                    str(BIN / "py-spy"),
                    "record",
                    "--pid",
                    str(self.proc.pid),
                    "--subprocesses",
                    "--nonblocking",
                    *os.environ.get("BENCH_PYSPY_ARGS", "").split(),
                ),
                *(
                    "--rate",
                    "50",
                    "--format",
                    {".json": "speedscope", ".txt": "raw"}.get(path.suffix, "flamegraph"),
                ),
                *("-o", str(path)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> tuple[float, float]:
        """Sample a last time, stop the group (SIGTERM, then SIGKILL after 30 s); (CPU s, peak RSS MiB)."""
        seen = self.sampler.stop()
        cpu = sum(c for c, _ in seen.values()) - self.cpu0
        rss = max((r for _, r in seen.values()), default=0.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.profiler is not None:
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.send_signal(signal.SIGINT)
                self.profiler.wait(30)
            if self.profiler.returncode:
                assert self.profiler.stderr is not None
                log(f"py-spy exited {self.profiler.returncode}: {self.profiler.stderr.read()[-500:]!r}")
        self._log.close()
        return cpu, rss

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> Workers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self.profiler is not None and self.profiler.poll() is None:
            self.profiler.kill()
            self.profiler.wait(10)


def wait_finished(db_url: str, run_id: str, timeout_s: float, meter: Meter, workers: Workers) -> None:
    """Poll the ledger until the run is finished (each poll is one transaction, counted out)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            meter.own_queries += 1
            row = conn.execute("SELECT state FROM runs WHERE id = %s", (run_id,)).fetchone()
            if row and row[0] == "finished":
                return
            if workers.proc.poll() is not None:
                raise BenchError(f"the worker exited with {workers.proc.returncode}:\n{workers.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"run {run_id} not finished after {timeout_s:.0f} s ({row}):\n{workers.tail()}"
                )
            time.sleep(0.1)


def ledger_counts(db_url: str, run_id: str) -> dict[str, int]:
    """``channel:status`` → messages of the run (read after the meters are stopped)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT channel, status, count(*) FROM messages WHERE run_id = %s GROUP BY channel, status",
            (run_id,),
        ).fetchall()
    return {f"{channel}:{status}": int(n) for channel, status, n in rows}


def timeline(db_url: str, run_id: str) -> str:
    """Where the wall time went: the run created → first message sent → last sent → run finished."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT r.created_at, min(m.sent_at), max(m.sent_at), r.finished_at, count(m.sent_at)"
            " FROM runs r JOIN messages m ON m.run_id = r.id WHERE r.id = %s"
            " GROUP BY r.created_at, r.finished_at",
            (run_id,),
        ).fetchone()
    if row is None or row[1] is None or row[3] is None:
        return "no message sent"
    created, first, last, finished, sent = row
    steady = (last - first).total_seconds()
    rate = f", {(sent - 1) / steady:,.0f} msg/s between them" if steady > 0 else ""
    return (
        f"first sent {(first - created).total_seconds():.2f} s after the run was created, last"
        f" {(last - created).total_seconds():.2f} s{rate}; run finished"
        f" {(finished - last).total_seconds():.2f} s after the last"
    )


# -- the machine ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    with psycopg.connect(f"{PG}/postgres") as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "smartpush": version("smartpush"),
        "redis": redis_version,
        "postgresql": row[0] if row else "?",
        "load": os.getloadavg(),
    }
