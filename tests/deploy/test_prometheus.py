"""The shipped dashboard and alert rules against a real Prometheus scraping a real relay.

``promtool check rules`` (and ``check config``) validate deploy/prometheus/; then Debian's
``prometheus`` binary, on a free loopback port with a one-second scrape, scrapes a running
``tagrelay serve`` while events arrive: accepted ones, refused ones, one forwarder whose
destination answers 503 (retries) and one that answers 400 (dead letters). Every query of
every dashboard panel and variable, and every metric selection of every alert expression,
must then return data; the alerts those conditions should raise are pending or firing and
TagrelayDown is not, until the relay stops.

Without the prometheus binary the tests skip, unless ``TAGRELAY_REQUIRE_PROMETHEUS`` is set
(``.ci/run`` installs Debian's package and sets it): then they fail.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.rig import free_port, relay_process

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tagrelay.json"
SERVER_KEY = "prom-server-key"
BROWSER_KEY = "prom-browser-key"
ADMIN_TOKEN = "prom-admin-token-0123456789abcdef"
DEADLINE_SECS = 120.0


def binary_or_skip(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    why = f"the {name} binary is not installed (Debian's prometheus package)"
    if os.environ.get("TAGRELAY_REQUIRE_PROMETHEUS"):
        pytest.fail(f"{why}; required: TAGRELAY_REQUIRE_PROMETHEUS is set", pytrace=False)
    pytest.skip(f"{why}; .ci/run installs it and sets TAGRELAY_REQUIRE_PROMETHEUS=1")


# --- the static checks ------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    promtool = binary_or_skip("promtool")
    rules = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    # the check above can fail: a rule whose expression does not parse
    promtool = binary_or_skip("promtool")
    broken = yaml.safe_load(RULES.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum by (job (up"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode != 0


# --- what the queries are ---------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$job": "tagrelay",
    "$instance": ".*",
    "$forwarder": ".*",
}


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Grafana sends it, with the dashboard's variables at 'All'."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a variable this test does not know: {expr}"
    return expr


def variable_query(definition: str) -> str:
    """``label_values(selector, label)`` (a Grafana function) as PromQL that returns data
    when Grafana would list values."""
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition.strip())
    assert found, f"unexpected variable query {definition!r}"
    selector, label = found.groups()
    return f"count by ({label}) ({grafana_to_promql(selector)})"


def dashboard_queries() -> dict[str, str]:
    """Every query of the dashboard, by where it is: ``panel title [refId]`` -> PromQL."""
    queries: dict[str, str] = {}
    for panel in dashboard_panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            queries[f"panel {panel['id']} {panel['title']!r} [{target['refId']}]"] = (
                grafana_to_promql(target["expr"])
            )
    templating = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in templating:
        if variable["type"] == "query":
            queries[f"variable ${variable['name']}"] = variable_query(variable["definition"])
    return queries


_OPERATOR = re.compile(r"\s+(?:and|or|unless)\s+|==|!=|>=|<=|>|<")
_CONSTANT = re.compile(r"[\d\s.eE*/+()-]+")


def selections(expr: str) -> list[str]:
    """The parts of an alert expression that select data: the operands of its top-level
    comparisons and set operators (``a / b > 0.05 and c > 0.1`` -> ``a / b``, ``c``), the
    argument of ``absent(...)``, never a constant. Each must return data on a relay that
    is being watched, or the alert could never fire."""
    expr = expr.strip()
    while expr.startswith("(") and _closing(expr, 0) == len(expr) - 1:
        expr = expr[1:-1].strip()
    found = re.fullmatch(r"absent\((.*)\)", expr, flags=re.S)
    if found:
        return selections(found.group(1))
    parts, start, depth, i = [], 0, 0, 0
    while i < len(expr):
        char = expr[i]
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif char in "\"'":
            i = expr.index(char, i + 1)
        elif depth == 0:
            operator = _OPERATOR.match(expr, i)
            if operator:
                parts.append(expr[start:i])
                start = i = operator.end()
                continue
        i += 1
    parts.append(expr[start:])
    if len(parts) == 1:
        return [] if _CONSTANT.fullmatch(expr) else [expr]
    return [s for part in parts for s in selections(part)]


def _closing(expr: str, opening: int) -> int:
    depth = 0
    for i in range(opening, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def test_selections_split_an_alert_expression_into_what_it_reads() -> None:
    expr = 'sum(rate(a{x="1>2"}[5m])) / sum(rate(b[5m])) > 0.05 and sum(rate(b[5m])) > 0.1'
    ratio = 'sum(rate(a{x="1>2"}[5m])) / sum(rate(b[5m]))'
    assert selections(expr) == [ratio, "sum(rate(b[5m]))"]
    assert selections('up{job="t"} == 0 or t_up == 0') == ['up{job="t"}', "t_up"]
    assert selections('absent(up{job="t"})') == ['up{job="t"}']
    assert selections("predict_linear(f[1h], 4 * 3600) < 0") == ["predict_linear(f[1h], 4 * 3600)"]
    assert selections("s / (m > 0) > 0.8") == ["s / (m > 0)"]


# --- the live run -----------------------------------------------------------------------


class _Destination(BaseHTTPRequestHandler):
    """A destination that answers 503 on /fail and 400 on /refuse."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = {"/fail": 503, "/refuse": 400}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"no")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def destination() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Destination)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def relay_config(tmp_path: Path, port: int, admin_port: int, destination: str) -> Path:
    config = {
        "data_dir": str(tmp_path / "data"),
        "server": {"host": "127.0.0.1", "port": port},
        # /metrics on the admin listener, behind its token, as deploy/compose.yaml has it
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token": ADMIN_TOKEN},
        "keys": [
            {"id": "backend", "kind": "server", "key": SERVER_KEY},
            {
                "id": "website",
                "kind": "browser",
                "key": BROWSER_KEY,
                "allowed_origins": ["https://www.shop.test"],
            },
        ],
        "spool": {"max_size_mb": 1024},
        "logging": {"level": "warning", "format": "json"},
        "forwarders": [
            {"id": "warehouse", "type": "warehouse", "batch": {"max_wait_secs": 0.2}},
            {
                "id": "failing",
                "type": "webhook",
                "endpoint": f"{destination}/fail",
                "batch": {"max_wait_secs": 0.2},
                "retry": {"initial_backoff_secs": 0.2, "max_backoff_secs": 0.5},
            },
            {
                "id": "refused",
                "type": "webhook",
                "endpoint": f"{destination}/refuse",
                "batch": {"max_wait_secs": 0.2},
                "filter": {"include_types": ["track"]},
            },
        ],
    }
    path = tmp_path / "tagrelay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prometheus_config(tmp_path: Path, target: str) -> Path:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "tagrelay",
                "metrics_path": "/metrics",
                "authorization": {"credentials": ADMIN_TOKEN},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, binary: str, config: Path, tmp_path: Path) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:  # loopback only
            return json.loads(resp.read())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "prometheus exited:\n" + self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise AssertionError("prometheus did not become ready:\n" + self.log())

    def query(self, promql: str) -> list[Any]:
        """The result of an instant query; an error (a query that does not parse) fails."""
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        result: list[Any] = answer["data"]["result"]
        return result

    def active_alerts(self) -> dict[str, str]:
        alerts = self.get("/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"]: a["state"] for a in alerts}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class Traffic:
    """Events sent to the relay: accepted ones, an identify (filtered by ``refused``), a
    request with a wrong key and a CORS preflight from an origin not allowed."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.sent = 0

    def round(self) -> None:
        batch = [
            {"type": "track", "event": "Signed Up", "userId": f"u-{self.sent + i}"}
            for i in range(9)
        ]
        batch.append({"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}})
        self.sent += len(batch)
        assert self._post("/v1/batch", {"batch": batch}, SERVER_KEY) == 200
        assert self._post("/v1/track", {"type": "track", "event": "x"}, "wrong-key") == 401
        preflight = urllib.request.Request(
            f"{self.base}/v1/track",
            method="OPTIONS",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
        )
        try:
            urllib.request.urlopen(preflight, timeout=10).close()
        except urllib.error.HTTPError as err:
            err.close()

    def _post(self, path: str, body: dict[str, Any], key: str) -> int:
        auth = base64.b64encode(f"{key}:".encode()).decode()
        request = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            err.close()
            return int(err.code)


ALERTS_RAISED = {
    # what the traffic above must raise: rejects are 2 in 12, every attempt of `failing`
    # fails, every event `refused` takes becomes a dead letter
    "TagrelayIngestRejectsRising",
    "TagrelayForwarderErrorRateHigh",
    "TagrelayDeadLettersGrowing",
}


@pytest.mark.slow
def test_every_dashboard_query_and_alert_expression_returns_data(
    tmp_path: Path, destination: str
) -> None:
    binary = binary_or_skip("prometheus")
    relay_port, admin_port = free_port(), free_port()
    config = relay_config(tmp_path, relay_port, admin_port, destination)
    with relay_process(config, relay_port, "", tmp_path / "relay.log") as relay:
        target = f"127.0.0.1:{admin_port}"
        prometheus = Prometheus(binary, prometheus_config(tmp_path, target), tmp_path)
        try:
            prometheus.wait_ready()
            wanted = queries_to_check(prometheus)
            traffic = Traffic(relay_port)
            missing = dict(wanted)
            alerts: dict[str, str] = {}
            deadline = time.monotonic() + DEADLINE_SECS
            while time.monotonic() < deadline:
                traffic.round()
                for where, promql in list(missing.items()):
                    if prometheus.query(promql):
                        del missing[where]
                alerts = prometheus.active_alerts()
                if not missing and alerts.keys() >= ALERTS_RAISED:
                    break
                time.sleep(0.5)

            assert missing == {}, (
                "queries that returned no data while events arrived:\n"
                + "\n".join(f"  {where}: {promql}" for where, promql in missing.items())
            )
            assert alerts.keys() >= ALERTS_RAISED, alerts
            assert "TagrelayDown" not in alerts

            # The relay stops: Prometheus sees it down (what TagrelayDown fires on).
            relay.send_signal(signal.SIGTERM)
            relay.wait(30)
            deadline = time.monotonic() + 30
            down: list[Any] = []
            while time.monotonic() < deadline and not down:
                time.sleep(0.5)
                down = prometheus.query('up{job="tagrelay"} == 0')
            assert down, "Prometheus did not see the stopped relay as down"
        finally:
            prometheus.stop()


def queries_to_check(prometheus: Prometheus) -> dict[str, str]:
    """Every query that must return data, by where it comes from. Every whole alert
    expression must evaluate."""
    wanted = dashboard_queries()
    for rule in alert_rules():
        parts = selections(rule["expr"])
        assert parts, f"{rule['alert']} selects nothing"
        prometheus.query(rule["expr"])
        for i, selection in enumerate(parts):
            wanted[f"alert {rule['alert']} [{i}]"] = selection
    return wanted
