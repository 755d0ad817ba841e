"""A real Prometheus and Alertmanager against a real worker (``run``) and the simulator.

Checks what can be checked without a Grafana server: every PromQL expression of the
dashboard (deploy/grafana/sequin-worker.json) parses and returns data from live metrics; the
alerting rules (deploy/prometheus/alerts.yml) evaluate without error on real series, stay
quiet while all is well, and one of them (dead letters) fires and reaches Alertmanager with
its consumer; and ``promtool check metrics`` accepts the live ``/metrics``.

Needs ``prometheus``, ``promtool`` and ``prometheus-alertmanager`` (Debian packages of the same
names; `.ci/run` installs them). Where they are missing the test is skipped, with the reason
in pytest's summary.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.helpers import ROOT, TOKEN, free_port, spawn_cli, wait_for, worker_env
from worker.simulator import FaultConfig, Simulator

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
DASHBOARD = ROOT / "deploy" / "grafana" / "sequin-worker.json"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"

_missing = [
    name
    for name, path in (
        ("prometheus", PROMETHEUS),
        ("promtool", PROMTOOL),
        ("prometheus-alertmanager", ALERTMANAGER),
    )
    if path is None
]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"NOT TESTED: {', '.join(_missing)} not installed "
    "(apt-get install prometheus prometheus-alertmanager; .ci/run does)",
)

# Dashboard targets that may legitimately have no series yet: a labelled counter has none
# until its first increment, and nothing makes a batch fail here. Their panel must still
# return data through its other target (the failing-seconds gauge), and they must parse.
MAY_BE_EMPTY = {("Batch failures", "A")}
RATE_INTERVAL = "20s"  # what Grafana would put for $__rate_interval at a 1 s scrape interval


@contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; raises AssertionError with Prometheus' message if it does not parse."""
    r = requests.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body.get("status") == "success", f"{expr}\n-> {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr with Grafana's variables filled in) for every target."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = (
                target["expr"]
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$consumer", "default")
            )
            assert "$" not in expr, f"unhandled variable in {expr}"
            out.append((panel["title"], target["refId"], expr))
    return out


def test_prometheus_scrapes_a_real_worker(db: str, tmp_path: Path) -> None:
    assert PROMETHEUS and PROMTOOL and ALERTMANAGER
    ops_port, prom_port, am_port = free_port(), free_port(), free_port()
    prom, am = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}"

    # Prometheus: the example configuration, with this test's targets and 1 s intervals.
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{am_port}"]}
    ]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "sequin-worker"  # the name the rules select `up` by
    job["static_configs"] = [{"targets": [f"127.0.0.1:{ops_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alertmanager.yml").write_text(
        yaml.safe_dump(
            {
                "route": {"receiver": "null", "group_wait": "1s", "group_interval": "1s"},
                "receivers": [{"name": "null"}],
            }
        )
    )

    with (
        Simulator(token=TOKEN, seed=7, records=2000, append_rate=50) as sim,
        process(
            [
                ALERTMANAGER,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            tmp_path / "alertmanager.log",
        ),
        process(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp_path / "prometheus.log",
        ),
    ):
        # Some 429s (retries by reason, API requests by status) and one malformed record
        # (a number where upstream_id must be a string: dead-lettered).
        sim.faults = FaultConfig(rate_429=0.2, retry_after=0.05, retry_after_http_date_share=0)
        sim.append_raw(
            json.dumps(
                {
                    "sync_id": "e6bd2ca5-36aa-4fce-9730-5543509a7747",
                    "collection_id": "stripe:customer",
                    "upstream_id": 12345,
                    "upstream_updated_at": "2024-01-01T00:00:01Z",
                    "data": {"id": 12345},
                    "deleted": False,
                    "created_at": "2024-01-01T00:00:01Z",
                }
            )
        )
        worker = spawn_cli(["run"], worker_env(sim, db, SEQUIN_HTTP_PORT=str(ops_port)))
        try:
            metrics_url = f"http://127.0.0.1:{ops_port}/metrics"
            wait_for(
                lambda: (
                    "sequin_worker_records_dead_lettered_total{"
                    in requests.get(metrics_url, timeout=2).text
                ),
                60,
                "the worker's dead letter",
                step=0.25,
            )

            # The reference linter on the live exposition.
            text = requests.get(metrics_url, timeout=2).text
            lint = subprocess.run(
                [PROMTOOL, "check", "metrics"],
                input=text,
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

            wait_for(
                lambda: query(prom, 'up{job="sequin-worker"} == 1'),
                60,
                "Prometheus scraping the worker",
                step=0.25,
            )
            assert wait_for(
                lambda: query(prom, "sequin_worker_ready == 1"),
                60,
                "sequin_worker_ready == 1",
                step=0.25,
            )

            # Every dashboard expression parses and returns data.
            targets = dashboard_targets()
            for _, _, expr in targets:
                query(prom, expr)  # parses (raises with Prometheus' error otherwise)

            def empty() -> list[tuple[str, str]]:
                return [
                    (title, ref)
                    for title, ref, expr in targets
                    if (title, ref) not in MAY_BE_EMPTY and not query(prom, expr)
                ]

            wait_for(
                lambda: not empty() or None, 60, "every dashboard query returns data", step=0.25
            )
            for title in {t for t, _, _ in targets}:
                assert any(query(prom, e) for t, _, e in targets if t == title), title

            # The rules evaluate without error on real series; all is well, so none of the
            # alerts about leadership or availability is even pending.
            def rules() -> list[dict[str, Any]]:
                r = requests.get(f"{prom}/api/v1/rules", timeout=5).json()
                return [rule for g in r["data"]["groups"] for rule in g["rules"]]

            wait_for(
                lambda: all(r.get("lastEvaluation", "").startswith("2") for r in rules()) or None,
                60,
                "every rule evaluated",
                step=0.25,
            )
            time.sleep(2)
            bad = [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"]
            assert not bad, bad
            active = {
                a["labels"]["alertname"]
                for a in requests.get(f"{prom}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
            }
            quiet = {
                "SequinWorkerNoLeader",
                "SequinWorkerTwoLeaders",
                "SequinWorkerDown",
                "SequinWorkerNotReady",
                "SequinWorkerBatchFailing",
            }
            assert not active & quiet, active

            # The dead letter fires its alert, which Alertmanager receives with the consumer.
            def delivered() -> list[dict[str, Any]]:
                alerts = requests.get(f"{am}/api/v2/alerts", timeout=5).json()
                return [
                    a for a in alerts if a["labels"].get("alertname") == "SequinWorkerDeadLetters"
                ]

            (alert,) = wait_for(delivered, 60, "SequinWorkerDeadLetters in Alertmanager", step=0.25)
            assert alert["labels"]["consumer"] == "default"
            assert alert["labels"]["collection"] == "stripe:customer"
            assert re.search(r"\bConsumer default kept\b", alert["annotations"]["description"])
        finally:
            worker.terminate()
            worker.wait(timeout=30)
