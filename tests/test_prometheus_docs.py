"""docs/grafana-dashboard.json and docs/prometheus-alerts.yml stay true to the proxy.

Every metric name they use is in the /metrics of a running proxy after traffic (OAuth on, the
gateway rejecting some sends, some requests answered 429), every expression parses (promtool,
from Debian's prometheus package, which ./scripts/test installs), and each alert fires on the
series it is meant for (promtool test rules, tests/prometheus/alerts.test.yml).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerFactory, StartProxy
from tests.dashboard_rig import start_rig

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "docs" / "grafana-dashboard.json"
ALERTS = ROOT / "docs" / "prometheus-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts.test.yml"
METRIC = re.compile(r"\bctct_proxy_[a-z0-9_]+")
# Grafana's variables, replaced by what they stand for so that promtool can parse the queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$key": ".*",
}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing (Debian's prometheus package): run ./scripts/test"
    return path


def run(*args: str | Path) -> str:
    done = subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def grafana_expressions() -> list[str]:
    """The PromQL of every panel target in the Grafana dashboard."""

    def walk(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(GRAFANA.read_text())))


def test_the_alert_rules_parse_and_fire_where_their_tests_say() -> None:
    assert "SUCCESS: 8 rules found" in run("check", "rules", ALERTS)
    # promtool resolves rule_files relative to the test file.
    assert "SUCCESS" in run("test", "rules", ALERT_TESTS)


def test_every_grafana_query_parses(tmp_path: Path) -> None:
    expressions = grafana_expressions()
    assert len(expressions) >= 15
    rules = []
    for n, expr in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"grafana:query_{n}", "expr": expr})
    # JSON is YAML: a rules file promtool checks like any other.
    path = tmp_path / "grafana-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "grafana", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run("check", "rules", path)


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    start_server: ServerFactory,
    start_proxy: StartProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # The gateway takes 5/s where the proxy thinks 20: rejections and replays; a day of 12
    # requests: the proxy answers the rest 429 itself.
    rig = await start_rig(
        start_server, start_proxy, http, tmp_path, sim_qps=5, qps=20.0, daily_quota=12
    )
    statuses = await rig.burst(16, concurrency=8)
    assert 200 in statuses and 429 in statuses
    text = await rig.text("/metrics")
    exposed, declared = set(), set()
    for family in text_string_to_metric_families(text):
        declared.add(family.name)
        declared.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        if family.samples:  # a histogram's family name counts as used where its series are
            exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
    used = set(METRIC.findall(GRAFANA.read_text() + ALERTS.read_text()))
    assert len(used) >= 15
    missing = sorted(name for name in used if name not in exposed)
    assert missing == [], f"used by the docs, not in /metrics: {missing}"
