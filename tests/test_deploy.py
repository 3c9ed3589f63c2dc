"""deploy/: what an operator copies (compose, Kubernetes, systemd, cron, Prometheus, Grafana) is valid,
queries only the metrics SPEC.md lists, and runs only real smartpush commands.

External checkers run where they are installed, and a test that needs a missing one skips and says
which: `promtool` (Debian's `prometheus` package, which .ci/run installs), `docker compose`,
`systemd-analyze`, the `kubernetes-validate` package. The structural checks below run everywhere.
"""

from __future__ import annotations

import configparser
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SPEC = ROOT.parent / "shared" / "SPEC.md"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "smartpush.json"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
COMPOSE = DEPLOY / "docker-compose.yml"
CRONTAB = DEPLOY / "cron" / "smartpush.crontab"

Run = Callable[..., subprocess.CompletedProcess[str]]

#: SPEC.md "Metrics", mirrored for when ../shared is not beside the repository (a test below keeps the
#: mirror equal to the table whenever it is). name -> (type, labels).
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "smartpush_messages_total": ("counter", frozenset({"campaign", "channel", "provider", "status"})),
    "smartpush_provider_requests_total": ("counter", frozenset({"provider", "outcome"})),
    "smartpush_provider_latency_seconds": ("histogram", frozenset({"provider", "channel"})),
    "smartpush_time_to_provider_seconds": ("histogram", frozenset({"channel"})),
    "smartpush_time_to_delivery_seconds": ("histogram", frozenset({"channel"})),
    "smartpush_rate_limit_wait_seconds_total": ("counter", frozenset({"provider"})),
    "smartpush_sms_parts_total": ("counter", frozenset({"provider", "encoding"})),
    "smartpush_run_messages": ("gauge", frozenset({"run", "status"})),
    "smartpush_queue_messages": ("gauge", frozenset({"queue"})),
}
#: `outcome` values (SPEC.md's table) and message statuses (SPEC.md "Message lifecycle", plus `waiting`,
#: README "How a run goes").
OUTCOMES = {"ok", "throttled", "transient", "permanent"}
STATUSES = {
    "created",
    "sending",
    "sent",
    "delivered",
    "temporary-failure",
    "permanent-failure",
    "technical-failure",
    "invalid",
    "suppressed",
    "skipped",
    "expired",
    "cancelled",
    "waiting",
}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: SPEC.md's "queue (waiting, delayed)": smartpush/metrics.py gives each queue's two lengths as `state`.
STATE_LABELS = {"smartpush_queue_messages": frozenset({"state"})}

#: Placeholders for the environment the example configurations read.
FAKE_ENV = {
    "SMARTPUSH_BROKER_URL": "redis://127.0.0.1:1/0",
    "SMARTPUSH_DATABASE_URL": "postgresql://smartpush:x@127.0.0.1:1/smartpush",
    "SMARTPUSH_PUBLIC_URL": "https://notifications.example.org",
    "SMARTPUSH_SECRET_KEY": "0123456789abcdef0123456789abcdef",
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": "x",
    "OVH_APPLICATION_KEY": "x",
    "OVH_APPLICATION_SECRET": "x",
    "OVH_CONSUMER_KEY": "x",
    "SMTP_USER": "x",
    "SMTP_PASSWORD": "x",
}
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "x",
    "SMARTPUSH_SECRET_KEY": "x",
    "GRAFANA_ADMIN_PASSWORD": "x",
}


# --- metric names --------------------------------------------------------------------------------


def parse_spec_metrics(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*`(smartpush_\w+)`\s*\|\s*(\w+)\s*\|\s*(.*?)\s*\|\s*$", line)
        if row:
            labels = re.sub(r"\([^)]*\)", "", row[3])  # "(ok, throttled, …)", "(live progress)"
            found[row[1]] = (row[2], frozenset(x.strip() for x in labels.split(",") if x.strip()))
    return found


def spec_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    return parse_spec_metrics(SPEC.read_text()) if SPEC.is_file() else SPEC_METRICS


def series_names(metrics: dict[str, tuple[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    """The series names a query may use, with their labels: histograms as _bucket, _sum, _count."""
    names: dict[str, frozenset[str]] = {}
    for name, (kind, labels) in metrics.items():
        if kind == "histogram":
            names[name + "_bucket"] = labels | {"le"}
            names[name + "_sum"] = labels
            names[name + "_count"] = labels
        else:
            names[name] = labels | STATE_LABELS.get(name, frozenset())
    return names


def dramatiq_series() -> dict[str, frozenset[str]]:
    """Dramatiq's own metrics, read from its Prometheus middleware's source (the installed version)."""
    spec = importlib.util.find_spec("dramatiq.middleware.prometheus")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    labels = frozenset({"queue_name", "actor_name"})
    names: dict[str, frozenset[str]] = {}
    for name in set(re.findall(r'"(dramatiq_[a-z_]+)"', source)):
        if name.startswith("dramatiq_prom"):  # dramatiq_prom_db, _host, _port: settings
            continue
        if name.endswith("_milliseconds"):
            names.update({name + s: labels for s in ("_sum", "_count")} | {name + "_bucket": labels | {"le"}})
        else:
            names[name] = labels
    return names


KNOWN_SERIES = {**series_names(spec_metrics()), **dramatiq_series()}
METRIC_RE = re.compile(r"\b((?:smartpush|dramatiq)_[a-z0-9_]+)\b\s*(\{[^}]*\})?")
MATCHER_RE = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def query_problems(expr: str) -> list[str]:
    """Metric names, label names and `status`/`outcome` values of one PromQL query that SPEC lacks."""
    problems: list[str] = []
    labels_here: set[str] = set(TARGET_LABELS)
    for name, matchers in METRIC_RE.findall(expr):
        if name not in KNOWN_SERIES:
            problems.append(f"unknown metric {name}")
            continue
        allowed = KNOWN_SERIES[name] | TARGET_LABELS
        labels_here |= allowed
        for label, _op, value in MATCHER_RE.findall(matchers):
            if label not in allowed:
                problems.append(f"{name} has no label {label}")
            known = {"outcome": OUTCOMES, "status": STATUSES}.get(label)
            if known is not None and "$" not in value:
                unknown = [v for v in value.split("|") if v not in known]
                problems += [f"{name}: {label} {v!r} is not a known value" for v in unknown]
    if re.search(r"\bsmartpush:", expr):  # recorded series: their labels are checked where recorded
        return problems
    for group in GROUPING_RE.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in labels_here:
                problems.append(f"grouping by {label}, a label of none of the query's metrics")
    return problems


def test_spec_metrics_table_is_mirrored() -> None:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not beside the repository: the tests use the mirror SPEC_METRICS")
    text = SPEC.read_text()
    assert parse_spec_metrics(text) == SPEC_METRICS
    assert "outcome (ok, throttled, transient, permanent)" in text


def test_metrics_the_code_registers_have_spec_types() -> None:
    from prometheus_client import REGISTRY

    import smartpush.metrics  # noqa: F401  (registers smartpush's metrics)

    spec = spec_metrics()
    for family in REGISTRY.collect():
        exposed = family.name + "_total" if family.type == "counter" else family.name
        if exposed in spec:
            assert family.type == spec[exposed][0], exposed


def test_every_metric_deploy_queries_is_registered_by_the_code() -> None:
    from prometheus_client import REGISTRY

    import smartpush.metrics

    registered: set[str] = set()
    for family in REGISTRY.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        registered |= set(series_names({name: (family.type, frozenset())}))
    # Gauges read when scraped (a collector, not a stored metric) are named by constants of the module.
    constants = vars(smartpush.metrics).values()
    registered |= {v for v in constants if isinstance(v, str) and v.startswith("smartpush_")}
    queried = {name for expr in dashboard_queries() + rule_queries() for name, _ in METRIC_RE.findall(expr)}
    missing = {name for name in queried if name.startswith("smartpush_")} - registered
    assert not missing, f"queried by deploy/ but not registered: {sorted(missing)}"


def test_query_checker_catches_mistakes() -> None:
    assert query_problems('sum by (provider) (rate(smartpush_messages_total{status="sent"}[1m]))') == []
    assert query_problems("rate(smartpush_messages_sent_total[1m])") == [
        "unknown metric smartpush_messages_sent_total"
    ]
    assert query_problems('smartpush_provider_requests_total{outcome="error"}') == [
        "smartpush_provider_requests_total: outcome 'error' is not a known value"
    ]
    assert query_problems('smartpush_queue_messages{phone="+33"}') == [
        "smartpush_queue_messages has no label phone"
    ]
    assert query_problems("sum by (campaign) (smartpush_run_messages)") == [
        "grouping by campaign, a label of none of the query's metrics"
    ]
    assert (
        query_problems("histogram_quantile(0.9, rate(smartpush_time_to_delivery_seconds_bucket[5m]))") == []
    )


# --- Prometheus ----------------------------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("promtool is missing: `apt-get install prometheus` provides it (.ci/run installs it)")
    return found


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def load_rules() -> dict[str, Any]:
    data = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    assert isinstance(data, dict)
    return data


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]


def rule_queries() -> list[str]:
    return [rule["expr"] for group in load_rules()["groups"] for rule in group["rules"]]


def test_promtool_check_config() -> None:
    result = run_promtool("check", "config", PROMETHEUS / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_targets_workers_and_serve() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["smartpush-worker"]["dns_sd_configs"][0]["port"] == 9191
    assert jobs["smartpush-serve"]["static_configs"][0]["targets"] == ["serve:8080"]
    assert jobs["smartpush-serve"].get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


REQUIRED_ALERTS = {
    "SmartpushProviderErrorRateHigh",
    "SmartpushProviderThrottled",
    "SmartpushRunStuck",
    "SmartpushQueueBacklogGrowing",
    "SmartpushDeliveryRatioDropping",
    "SmartpushNoWorkerUp",
}


def test_alert_rules_say_what_to_do() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= REQUIRED_ALERTS
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name} has no `for:`"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name
        assert len(rule["annotations"]["description"]) > 120, f"{name}: say what happens and what to do"


def test_alert_rules_query_known_metrics() -> None:
    groups = load_rules()["groups"]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    for expr in rule_queries():
        assert query_problems(expr) == [], expr
        for name in re.findall(r"\bsmartpush:[a-z0-9_:]+", expr):
            assert name in recorded, f"{name} is not recorded in alerts.yml"


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires_for(at: str, alert: str, expected: list[dict[str, str]]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": x} for x in expected]}


def quiet(at: str, alert: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


REQ = "smartpush_provider_requests_total"
MSG = "smartpush_messages_total"
RUN = "smartpush_run_messages"
QUEUE = "smartpush_queue_messages"

#: promtool unit tests: each scenario's series (1 sample a minute) and what must fire, or not, when.
ALERT_SCENARIOS: list[dict[str, Any]] = [
    {  # no worker at all; serve is up
        "input_series": [series("up", "1x30", job="smartpush-serve", instance="serve:8080")],
        "alert_rule_test": [
            quiet("1m", "SmartpushNoWorkerUp"),
            fires_for("5m", "SmartpushNoWorkerUp", [{"severity": "critical", "job": "smartpush-worker"}]),
            quiet("5m", "SmartpushServeDown"),
        ],
    },
    {  # one of two workers down; serve down
        "input_series": [
            series("up", "0x30", job="smartpush-worker", instance="10.0.0.2:9191"),
            series("up", "1x30", job="smartpush-worker", instance="10.0.0.3:9191"),
            series("up", "0x30", job="smartpush-serve", instance="serve:8080"),
        ],
        "alert_rule_test": [
            quiet("10m", "SmartpushNoWorkerUp"),
            fires_for(
                "10m",
                "SmartpushWorkerDown",
                [
                    {
                        "severity": "warning",
                        "job": "smartpush-worker",
                        "instance": "10.0.0.2:9191",
                    }
                ],
            ),
            fires_for("10m", "SmartpushServeDown", [{"severity": "critical"}]),
        ],
    },
    {  # sms-main: 2 of 12 requests/s fail (17 %); sms-backup: 1 %; push: 75 %; email throttled 17 %
        "input_series": [
            series(REQ, "0+600x60", provider="sms-main", outcome="ok"),
            series(REQ, "0+120x60", provider="sms-main", outcome="transient"),
            series(REQ, "0+600x60", provider="sms-backup", outcome="ok"),
            series(REQ, "0+6x60", provider="sms-backup", outcome="permanent"),
            series(REQ, "0+300x60", provider="fcm-main", outcome="ok"),
            series(REQ, "0+900x60", provider="fcm-main", outcome="transient"),
            series(REQ, "0+600x60", provider="smtp-relay", outcome="ok"),
            series(REQ, "0+120x60", provider="smtp-relay", outcome="throttled"),
        ],
        "alert_rule_test": [
            quiet("5m", "SmartpushProviderErrorRateHigh"),
            fires_for(
                "20m",
                "SmartpushProviderErrorRateHigh",
                [
                    {"severity": "warning", "provider": "sms-main"},
                    {"severity": "warning", "provider": "fcm-main"},
                ],
            ),
            fires_for("20m", "SmartpushProviderFailing", [{"severity": "critical", "provider": "fcm-main"}]),
            quiet("10m", "SmartpushProviderThrottled"),
            fires_for(
                "25m", "SmartpushProviderThrottled", [{"severity": "warning", "provider": "smtp-relay"}]
            ),
        ],
    },
    {  # r1: 200 messages `sending`, nothing finishes; r2 progresses; r3 waits for its window (created)
        "input_series": [
            series(RUN, "200x40", run="r1", status="sending"),
            series(RUN, "100x40", run="r1", status="sent"),
            series(RUN, "200x40", run="r2", status="sending"),
            series(RUN, "0+50x40", run="r2", status="sent"),
            series(RUN, "0x40", run="r3", status="sending"),
            series(RUN, "1000x40", run="r3", status="created"),
        ],
        "alert_rule_test": [
            quiet("15m", "SmartpushRunStuck"),
            fires_for("25m", "SmartpushRunStuck", [{"severity": "critical", "run": "r1"}]),
        ],
    },
    {  # bulk's waiting segments grow by 10 a minute (two workers report them); urgent is large but
        # flat; normal drains
        "input_series": [
            series(QUEUE, "60+10x90", queue="smartpush-bulk", state="waiting", instance="a"),
            series(QUEUE, "60+10x90", queue="smartpush-bulk", state="waiting", instance="b"),
            series(QUEUE, "50x90", queue="smartpush-bulk", state="delayed", instance="a"),
            series(QUEUE, "5000x90", queue="smartpush-urgent", state="waiting", instance="a"),
            series(QUEUE, "5000-50x90", queue="smartpush-normal", state="waiting", instance="a"),
        ],
        "alert_rule_test": [
            quiet("20m", "SmartpushQueueBacklogGrowing"),
            fires_for(
                "45m", "SmartpushQueueBacklogGrowing", [{"severity": "warning", "queue": "smartpush-bulk"}]
            ),
        ],
    },
    {  # sms-main delivers 95 % for 3 h, then 20 %; smtp-relay sends receipts never
        "input_series": [
            series(MSG, "0+600x300", campaign="c", channel="sms", provider="sms-main", status="sent"),
            series(
                MSG,
                "0+570x180 102720+120x119",
                campaign="c",
                channel="sms",
                provider="sms-main",
                status="delivered",
            ),
            series(MSG, "0+600x300", campaign="c", channel="email", provider="smtp-relay", status="sent"),
        ],
        "alert_rule_test": [
            quiet("170m", "SmartpushDeliveryRatioDropping"),
            fires_for(
                "240m", "SmartpushDeliveryRatioDropping", [{"severity": "warning", "provider": "sms-main"}]
            ),
        ],
    },
]


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests over the scenarios above (annotations left out: the texts are prose)."""
    rules = load_rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": []}
    for scenario in ALERT_SCENARIOS:
        tests["tests"].append({"interval": "1m", **scenario})
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run_promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {case["alertname"] for s in ALERT_SCENARIOS for case in s["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


# --- Grafana -------------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    dashboard = load_dashboard()
    queries = [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_is_valid() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "smartpush" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    for panel in all_panels(dashboard["panels"]):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["query"]["query"].startswith("label_values("), variable["name"]


def test_dashboard_queries_only_spec_metrics() -> None:
    for expr in dashboard_queries():
        assert query_problems(expr) == [], expr


def test_dashboard_shows_what_ops_need() -> None:
    text = "\n".join(dashboard_queries())
    for needed in (
        "smartpush_run_messages",
        "sum by (provider) (rate(smartpush_messages_total",
        "smartpush_provider_requests_total",
        "histogram_quantile(0.95, sum by (le, channel) (rate(smartpush_time_to_provider_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, channel) (rate(smartpush_time_to_delivery_seconds_bucket",
        "smartpush_provider_latency_seconds_bucket",
        "max by (queue, state) (smartpush_queue_messages)",
        "rate(smartpush_rate_limit_wait_seconds_total",
        "sum by (provider, encoding) (rate(smartpush_sms_parts_total",
        "dramatiq_messages_total",
        "dramatiq_message_errors_total",
        "dramatiq_message_duration_milliseconds_bucket",
        'up{job="smartpush-worker"}',
    ):
        assert needed in text, needed


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel's PromQL, Grafana's variables filled in, as recording rules `promtool` checks."""
    rules = []
    for i, expr in enumerate(q for q in dashboard_queries() if not q.startswith("label_values(")):
        filled = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
        filled = re.sub(r"\$\{?\w+\}?", ".*", filled)
        rules.append({"record": f"dashboard:query{i}", "expr": filled})
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", tmp_path / "queries.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "smartpush.yml").read_text())
    (provider,) = providers["providers"]
    grafana = load_compose()["services"]["grafana"]
    mounts = {target: source for source, target in (bind_mount(v) for v in grafana["volumes"])}
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


# --- docker compose and the image ------------------------------------------------------------------


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?message} in one value of the file."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match[1], match[2], match[3]
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg or ""
        if op == ":?":
            raise AssertionError(f"{name} is required: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)


def interpolate_all(data: Any, env: dict[str, str]) -> Any:
    if isinstance(data, str):
        return interpolate(data, env)
    if isinstance(data, list):
        return [interpolate_all(x, env) for x in data]
    if isinstance(data, dict):
        return {k: interpolate_all(v, env) for k, v in data.items()}
    return data


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as `docker compose config` sees it: parsed (anchors merged), then interpolated."""
    data = interpolate_all(yaml.safe_load(COMPOSE.read_text()), COMPOSE_ENV if env is None else env)
    assert isinstance(data, dict)
    return data


def compose_values(data: Any) -> Iterator[str]:
    if isinstance(data, str):
        yield data
    elif isinstance(data, list):
        for x in data:
            yield from compose_values(x)
    elif isinstance(data, dict):
        for v in data.values():
            yield from compose_values(v)


def bind_mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    if isinstance(volume, dict):
        return volume.get("source", ""), volume["target"]
    source, target, *_ = volume.split(":")
    return source, target


def smartpush_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if "build" in s}


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if (
        not docker
        or subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode
    ):
        pytest.skip("no `docker compose` plugin here: test_compose_file_structure checks the file instead")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, **COMPOSE_ENV},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_file_structure() -> None:
    compose = load_compose()
    services = compose["services"]
    assert {"redis", "postgres", "worker", "serve", "scheduler", "prometheus", "grafana"} <= set(services)
    named = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source, target = bind_mount(volume)
            assert target.startswith("/"), (name, volume)
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"

    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(bind_mount(v)[1] == "/data" for v in redis["volumes"])
    assert "healthcheck" in services["postgres"]
    assert any(bind_mount(v)[1] == "/var/lib/postgresql/data" for v in services["postgres"]["volumes"])

    worker = services["worker"]
    assert worker["deploy"]["replicas"] >= 2
    assert worker["command"][:1] == ["worker"]
    assert worker["command"][worker["command"].index("--metrics-port") + 1] == "9191"
    assert worker["environment"]["SMARTPUSH_HEALTHCHECK_URL"] == "http://127.0.0.1:9191/metrics"
    assert services["serve"]["command"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    scheduler = services["scheduler"]
    assert scheduler["command"][0] == "scheduler"
    assert "profiles" not in scheduler, "`docker compose up` starts the scheduler"
    assert duration_s(scheduler["stop_grace_period"]) >= 60, "a launch in progress finishes at SIGTERM"

    for name, service in smartpush_services(compose).items():
        env = service["environment"]
        for var in ("SMARTPUSH_BROKER_URL", "SMARTPUSH_DATABASE_URL", "SMARTPUSH_SECRET_KEY"):
            assert env.get(var), (name, var)
        assert env["dramatiq_prom_db"] == env["PROMETHEUS_MULTIPROC_DIR"], name
        tmpfs = [entry.split(":")[0] for entry in service["tmpfs"]]
        assert any(env["PROMETHEUS_MULTIPROC_DIR"].startswith(t + "/") for t in tmpfs), name
        targets = {bind_mount(v)[1] for v in service["volumes"]}
        assert "/srv/smartpush/smartpush.yaml" in targets, name
        assert service["read_only"] is True, name

    prometheus_mounts = dict(bind_mount(v) for v in services["prometheus"]["volumes"])
    assert prometheus_mounts["./prometheus"] == "/etc/prometheus"


def test_compose_secrets_come_from_env_example() -> None:
    values = compose_values(yaml.safe_load(COMPOSE.read_text()))
    required = {name for value in values for name in re.findall(r"\$\{(\w+):\?", value)}
    listed = set(re.findall(r"^#?\s*(\w+)=", (DEPLOY / ".env.example").read_text(), re.M))
    assert required and required <= listed
    with pytest.raises(AssertionError, match="POSTGRES_PASSWORD"):
        load_compose({})


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for kind, a in instructions if kind == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    users = [a for kind, a in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert ("ENTRYPOINT", '["smartpush-entrypoint"]') in instructions
    assert any(kind == "HEALTHCHECK" for kind, _ in instructions)
    assert any(kind == "RUN" and "pip install --quiet ." in a for kind, a in instructions)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    sent = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for kind, arguments in instructions:
        if kind != "COPY" or arguments.startswith("--from"):
            continue
        for source in arguments.split()[:-1]:
            assert (ROOT / source).exists(), source
            path = source.rstrip("/")
            assert any(path == p or path.startswith(p + "/") for p in sent), (
                f"the .dockerignore drops {source}"
            )


def test_entrypoint_empties_the_metrics_folder(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "smartpush").write_text('#!/bin/sh\necho "args: $*"; ls -A "$PROMETHEUS_MULTIPROC_DIR"\n')
    (fake_bin / "smartpush").chmod(0o755)
    folder = tmp_path / "prom"
    (folder / "old").mkdir(parents=True)
    (folder / "counter_123.db").write_bytes(b"stale")
    result = subprocess.run(
        ["sh", str(DEPLOY / "docker" / "entrypoint.sh"), "worker", "--metrics-port", "9191"],
        env={"PATH": f"{fake_bin}:/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(folder)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "args: worker --metrics-port 9191\n"
    missing = tmp_path / "new" / "prom"
    result = subprocess.run(
        ["sh", str(DEPLOY / "docker" / "entrypoint.sh"), "serve"],
        env={"PATH": f"{fake_bin}:/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(missing)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and missing.is_dir(), result.stderr


@pytest.fixture
def http_status() -> Iterator[Callable[[int], str]]:
    """A loopback HTTP server answering every GET with the status given; yields a setter → its URL."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0])
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def set_status(code: int) -> str:
        status[0] = code
        return f"http://127.0.0.1:{server.server_port}/healthz"

    yield set_status
    server.shutdown()
    server.server_close()


def test_healthcheck_script(http_status: Callable[[int], str]) -> None:
    script = str(DEPLOY / "docker" / "healthcheck.py")
    for code, expected in ((200, 0), (503, 1)):
        url = http_status(code)
        env = {**os.environ, "SMARTPUSH_HEALTHCHECK_URL": url}
        result = subprocess.run(
            [sys.executable, script], env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == expected, (code, result.stderr)
    env = {**os.environ, "SMARTPUSH_HEALTHCHECK_URL": "http://127.0.0.1:9/healthz"}
    result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "unhealthy" in result.stderr


# --- the configuration examples --------------------------------------------------------------------


def uncomment_accounts(text: str) -> str:
    """The example's commented provider accounts, made live (`#   key:` → `  key:` under providers)."""
    return re.sub(r"^(\s*)# ( *[\w-]+:)", r"\1\2", text, flags=re.M)


def configmap_config() -> str:
    (configmap,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    text = configmap["data"]["smartpush.yaml"]
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("which", ["smartpush.yaml.example", "configmap"])
def test_example_configs_load_and_validate_the_example_campaign(
    which: str, project: Path, run_cli: Run
) -> None:
    text = (DEPLOY / which).read_text() if which != "configmap" else configmap_config()
    for content in (text, uncomment_accounts(text)):
        (project / "smartpush.yaml").write_text(content)
        result = run_cli("validate", "campaigns/rappel-vaccination-grippe.yaml", cwd=project, env=FAKE_ENV)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "warning" not in (result.stdout + result.stderr).lower()
    assert re.search(r"^\s*sms-main:", uncomment_accounts(text), re.M)
    assert not re.search(r"^\s*sms-main:", text, re.M), "real accounts stay commented out in the example"


# --- the scheduler ---------------------------------------------------------------------------------


def duration_s(value: str | int) -> float:
    """A duration as compose, systemd and Kubernetes write them: `120`, `120s`, `2m`."""
    from smartpush.units import parse_duration

    text = str(value)
    return float(text) if text.isdigit() else parse_duration(text).total_seconds()


def scheduler_commands() -> dict[str, list[str]]:
    return {where: argv for where, argv in deployed_commands() if argv[:1] == ["scheduler"]}


def test_scheduler_renews_its_lock_well_before_it_expires() -> None:
    """The active scheduler renews its Redis lock once a pass: passes must come well within the lock's
    expiry, or the lock lapses between two renewals and the standby (or nobody) takes over."""
    from smartpush.scheduler import DEFAULT_LOCK_TTL

    (tick,) = [p for p in smartpush_cli().commands["scheduler"].params if p.name == "tick"]
    found = scheduler_commands()
    assert {where.split()[0] for where in found} == {"compose", "kubernetes", "systemd"}
    for where, argv in found.items():
        every = argv[argv.index("--tick") + 1] if "--tick" in argv else str(tick.default)
        assert duration_s(every) <= DEFAULT_LOCK_TTL.total_seconds() / 2, where


# --- Kubernetes ------------------------------------------------------------------------------------


def k8s_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                document["__file__"] = path.name
                documents.append(document)
    return documents


def pod_specs() -> dict[str, dict[str, Any]]:
    specs = {}
    for document in k8s_documents():
        if document["kind"] == "Deployment":
            specs[document["metadata"]["name"]] = document["spec"]["template"]["spec"]
        elif document["kind"] == "CronJob":
            specs[document["metadata"]["name"]] = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def kustomization_resources() -> list[str]:
    (kustomization,) = [d for d in k8s_documents() if d["kind"] == "Kustomization"]
    resources = kustomization["resources"]
    assert isinstance(resources, list)
    return resources


def test_kubernetes_manifests_load() -> None:
    documents = k8s_documents()
    kinds = {d["kind"] for d in documents}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "CronJob"} <= kinds
    for document in documents:
        assert document.get("apiVersion") and document.get("kind"), document["__file__"]
        if document["kind"] != "Kustomization":
            assert document.get("metadata", {}).get("name"), document["__file__"]
    for resource in kustomization_resources():
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization_resources()
    applied = {d["__file__"] for d in documents} - {"kustomization.yaml", "secret.example.yaml"}
    assert applied <= set(kustomization_resources()), "every manifest is applied by `kubectl apply -k`"


def test_kubernetes_manifests_match_the_schema() -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="the kubernetes-validate package is not installed: YAML checks only"
    )
    for document in k8s_documents():
        if document["kind"] == "Kustomization":
            continue
        body = {k: v for k, v in document.items() if k != "__file__"}
        validate.validate(body, "1.30.0", strict=True)


def test_kubernetes_workloads() -> None:
    documents = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents() if "metadata" in d}
    specs = pod_specs()
    for name, spec in specs.items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert {"requests", "limits"} <= set(container["resources"]), name
            assert {"secretRef": {"name": "smartpush-secrets"}} in container["envFrom"], name
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/srv/smartpush/smartpush.yaml"]["subPath"] == "smartpush.yaml", name

    (worker,) = specs["smartpush-worker"]["containers"]
    assert worker["args"][0] == "worker"
    port = worker["args"][worker["args"].index("--metrics-port") + 1]
    assert {"name": "metrics", "containerPort": int(port)} in worker["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"]["port"] in ("metrics", int(port)), probe
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["PROMETHEUS_MULTIPROC_DIR"] == env["dramatiq_prom_db"]
    run_volume = next(v for v in specs["smartpush-worker"]["volumes"] if v["name"] == "run")
    assert run_volume["emptyDir"]["medium"] == "Memory"

    (serve,) = specs["smartpush-serve"]["containers"]
    assert serve["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/healthz"
    service = documents[("Service", "smartpush-serve")]
    serve_labels = documents[("Deployment", "smartpush-serve")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= serve_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ("http", 8080)

    scheduler = documents[("Deployment", "smartpush-scheduler")]
    assert scheduler["__file__"] in kustomization_resources()
    assert scheduler["spec"]["replicas"] >= 2, "one active, one hot standby (the Redis lock)"
    pod = specs["smartpush-scheduler"]
    assert pod["terminationGracePeriodSeconds"] >= 60, "a launch in progress finishes at SIGTERM"
    (container,) = pod["containers"]
    assert container["args"][0] == "scheduler"
    assert "ports" not in container, "the scheduler serves nothing"
    probes = [container[p] for p in ("livenessProbe", "readinessProbe", "startupProbe") if p in container]
    assert not any({"httpGet", "tcpSocket", "grpc"} & set(probe) for probe in probes), "no port to probe"
    budget = documents[("PodDisruptionBudget", "smartpush-scheduler")]
    labels = scheduler["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1

    cronjobs = [d for d in k8s_documents() if d["kind"] == "CronJob"]
    assert cronjobs
    for cronjob in cronjobs:
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        assert cronjob["spec"]["startingDeadlineSeconds"] > 0
        (send,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert send["args"][0] == "send"
        assert {"--yes", "--json", "--key"} <= set(send["args"])


def test_kubernetes_secret_example_holds_placeholders_only() -> None:
    (secret,) = [d for d in k8s_documents() if d["kind"] == "Secret"]
    assert secret["__file__"] == "secret.example.yaml"
    assert "data" not in secret
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value, key
    live = re.sub(r"#.*$", "", configmap_config(), flags=re.M)
    needed = set(re.findall(r"\$\{(\w+)", live))
    given = set(secret["stringData"]) | {"SMARTPUSH_PUBLIC_URL"}  # set in the pods' env
    assert needed <= given
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            assert "SMARTPUSH_PUBLIC_URL" in {e["name"] for e in container["env"]}, name


# --- systemd -------------------------------------------------------------------------------------


def unit_files() -> list[Path]:
    return sorted(p for p in SYSTEMD.iterdir() if p.suffix in {".service", ".timer"})


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes"}


def test_systemd_units_parse_and_are_hardened() -> None:
    units = {p.name: parse_unit(p) for p in unit_files()}
    long_running = {"smartpush-worker@.service", "smartpush-serve.service", "smartpush-scheduler.service"}
    assert long_running <= set(units)
    timers = [name for name in units if name.endswith(".timer")]
    assert timers
    for name, unit in units.items():
        assert unit.has_section("Unit") and unit["Unit"].get("Description"), name
        if name.endswith(".service"):
            service = unit["Service"]
            assert service["ExecStart"].startswith("/opt/smartpush/bin/smartpush "), name
            for key, value in HARDENING.items():
                assert service.get(key) == value, (name, key)
            assert service.get("User") or service.get("DynamicUser") == "yes", name
            assert service.get("EnvironmentFile") == "/etc/smartpush/smartpush.env", name
    worker = units["smartpush-worker@.service"]["Service"]
    assert "--metrics-port %i" in worker["ExecStart"]
    assert worker["RuntimeDirectory"].startswith("smartpush-worker-%i")
    assert "ReadWritePaths" in worker
    scheduler = units["smartpush-scheduler.service"]
    assert shlex.split(scheduler["Service"]["ExecStart"])[1] == "scheduler"
    assert scheduler["Service"]["Type"] == "simple" and scheduler["Service"]["Restart"] == "on-failure"
    assert scheduler["Service"]["KillSignal"] == "SIGTERM"
    assert duration_s(scheduler["Service"]["TimeoutStopSec"]) >= 60, "a launch in progress finishes"
    assert scheduler["Install"]["WantedBy"] == "multi-user.target"
    for timer_name in timers:
        timer = units[timer_name]["Timer"]
        assert timer["Persistent"] == "true" and timer["OnCalendar"]
        assert timer["Unit"] in units and units[timer["Unit"]]["Service"]["Type"] == "oneshot"
        assert units[timer_name].has_section("Install")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is missing: test_systemd_units_parse_and_are_hardened checks the units")
    exe = Path(sys.executable).parent / "smartpush"
    smartpush = str(exe) if exe.exists() else shutil.which("smartpush")
    assert smartpush
    names = []
    for path in unit_files():
        # verify wants ExecStart's program to exist: point it at this checkout's command.
        text = path.read_text().replace("/opt/smartpush/bin/smartpush", smartpush)
        name = path.name.replace("@.", "@9191.")
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


# --- cron ----------------------------------------------------------------------------------------


class CronJob:
    """One job line of a system crontab (/etc/cron.d): five time fields, the user, the command."""

    def __init__(self, line: str) -> None:
        fields = line.split(None, 6)
        assert len(fields) == 7, f"a system crontab line has 5 time fields, a user and a command: {line}"
        self.when, self.user, self.command = " ".join(fields[:5]), fields[5], fields[6]


def crontab_environment() -> dict[str, str]:
    lines = [line.strip() for line in CRONTAB.read_text().splitlines()]
    pairs = (line.split("=", 1) for line in lines if re.fullmatch(r"[A-Z_]+\s*=.*", line))
    return {name.strip(): value.strip() for name, value in pairs}


def crontab_jobs() -> list[CronJob]:
    lines = [line.strip() for line in CRONTAB.read_text().splitlines()]
    return [
        CronJob(line)
        for line in lines
        if line and not line.startswith("#") and not re.fullmatch(r"[A-Z_]+\s*=.*", line)
    ]


def smartpush_argv(command: str) -> list[str]:
    """The arguments of the smartpush program in a shell command line, up to its redirections."""
    words = shlex.split(command)
    assert "/opt/smartpush/bin/smartpush" in words, command
    argv = words[words.index("/opt/smartpush/bin/smartpush") + 1 :]
    end = next((i for i, word in enumerate(argv) if re.match(r"\d*[<>|&;]", word)), len(argv))
    return argv[:end]


def test_smartpush_argv_stops_at_the_shell() -> None:
    command = "cd /srv && exec /opt/smartpush/bin/smartpush send c.yaml --yes >> /var/log/x 2>&1"
    assert smartpush_argv(command) == ["send", "c.yaml", "--yes"]
    assert smartpush_argv("/opt/smartpush/bin/smartpush runs && true") == ["runs"]


def test_crontab_launches_campaigns_by_slot_key() -> None:
    from croniter import croniter

    jobs = crontab_jobs()
    assert jobs
    env = crontab_environment()
    assert env["CRON_TZ"] == "Europe/Paris"
    assert env["SHELL"] == "/bin/sh"
    (cronjob,) = [d for d in k8s_documents() if d["kind"] == "CronJob"]
    cronjob_campaign = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][1]
    for job in jobs:
        assert croniter.is_valid(job.when), job.when
        assert job.user == "smartpush", "runs as the smartpush user, never root"
        assert "%" not in job.command.replace("\\%", ""), "cron turns an unescaped % into a newline"
        argv = smartpush_argv(job.command)
        assert argv[0] == "send" and argv[1].startswith("campaigns/"), argv
        assert argv[argv.index("--key") + 1] == "auto"
        assert {"--yes", "--json"} <= set(argv)
        assert "cd /srv/smartpush" in job.command  # campaign paths are relative to the project
        assert ". /etc/smartpush/smartpush.env" in job.command  # cron does not read EnvironmentFile
        assert re.search(r">> ?/var/log/smartpush/\S+ 2>&1$", job.command), "stdout and stderr kept"
        result = subprocess.run(["sh", "-n", "-c", job.command], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        # The same campaign as the CronJob example, at the same times in the same zone.
        if argv[1] == cronjob_campaign:
            assert env["CRON_TZ"] == cronjob["spec"]["timeZone"]
            a, b = croniter(job.when, 0), croniter(cronjob["spec"]["schedule"], 0)
            assert [a.get_next(float) for _ in range(20)] == [b.get_next(float) for _ in range(20)]


# --- commands the deployment runs ------------------------------------------------------------------


def deployed_commands() -> list[tuple[str, list[str]]]:
    """Every smartpush command line in deploy/, without the program name."""
    found: list[tuple[str, list[str]]] = []
    for name, service in smartpush_services(load_compose()).items():
        found.append((f"compose {name}", [str(x) for x in service["command"]]))
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            assert "command" not in container, f"{name}: the image's entry point is smartpush; use args"
            found.append((f"kubernetes {name}", [str(x) for x in container["args"]]))
    for path in unit_files():
        if path.suffix == ".service":
            argv = shlex.split(parse_unit(path)["Service"]["ExecStart"])
            assert argv[0] == "/opt/smartpush/bin/smartpush", path.name
            found.append((f"systemd {path.name}", argv[1:]))
    for job in crontab_jobs():
        found.append((f"cron {job.when}", smartpush_argv(job.command)))
    return found


def smartpush_cli() -> click.Group:
    from smartpush.cli.main import cli

    assert isinstance(cli, click.Group)
    return cli


def command_problems(argv: list[str]) -> list[str]:
    cli = smartpush_cli()
    global_options = {"--config": True, "--json": False, "--help": False, "-h": False, "--version": False}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] not in global_options:
            return [f"unknown option {argv[i]}"]
        i += 2 if global_options[argv[i]] else 1
    if i == len(argv):
        return [] if argv else ["no command"]
    name, rest = argv[i], argv[i + 1 :]
    if name not in cli.commands:
        return [f"smartpush has no command {name!r}"]
    command = cli.commands[name]
    options = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    options |= {"--help", "-h"}
    return [
        f"smartpush {name} has no option {token}"
        for token in (t.split("=", 1)[0] for t in rest)
        if token.startswith("-") and token not in options
    ]


def test_deployment_runs_real_smartpush_commands() -> None:
    commands = deployed_commands()
    assert {"worker", "serve", "send", "scheduler"} <= {argv[0] for _, argv in commands if argv}
    assert {where.split()[0] for where, _ in commands} == {"compose", "kubernetes", "systemd", "cron"}
    for where, argv in commands:
        assert command_problems(argv) == [], (where, argv)
    assert command_problems(["sned", "x.yaml"]) == ["smartpush has no command 'sned'"]
    assert command_problems(["send", "x.yaml", "--yse"]) == ["smartpush send has no option --yse"]


# --- deploy/README.md ------------------------------------------------------------------------------


def test_sizing_figures_are_the_measured_ones() -> None:
    """Every figure of deploy/README.md's sizing table is in bench/RESULTS.md, on the machine it names."""
    readme = (DEPLOY / "README.md").read_text()
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    section = readme.split("## Sizing", 1)[1].split("\n## ", 1)[0]
    machine = "2 cores, AMD EPYC, Python 3.11.7"
    assert machine in section and machine in results
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    figures = [re.findall(r"\d{1,3}(?:,\d{3})+|\d+\.\d+", row[2]) for row in rows[1:]]
    assert sum(map(len, figures)) >= 10
    for figure in (f for row in figures for f in row):
        assert figure in results, f"{figure} is not in bench/RESULTS.md"
