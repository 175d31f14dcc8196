"""CONTRACT.md section 11 (*rev 3*): deploy/grafana-dashboard.json, every panel's PromQL answered with
data by a real Prometheus scraping a running gateway under traffic.

Prometheus runs in the foreground with its own config and data dir on a free loopback port (as in
test_prometheus.py); Grafana itself is not needed: its template variables are substituted as Grafana
would (``$job`` by its "All" value, ``$__rate_interval`` by a window that holds several scrapes).
"""

import json
import math
import re
import threading
import time

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import PROMETHEUS, ROOT, WebhookReceiver, start_prometheus, wait_until
from tests.integration.conftest import dialect_env

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
# Every series CONTRACT.md section 11 names that the dashboard is asked to show.
SHOWN = {
    "dtmf_requests_total",
    "dtmf_request_duration_seconds_bucket",
    "dtmf_cxone_attempts_total",
    "dtmf_audit_pending",
    "dtmf_audit_oldest_pending_seconds",
    "dtmf_audit_dead_letters",
    "dtmf_audit_dropped_total",
}


def dashboard():
    return json.loads(DASHBOARD.read_text())


def targets(model):
    return [(panel["title"], target) for panel in model["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_a_grafana_json_model_over_a_templated_datasource():
    model = dashboard()
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    assert model["title"] and model["uid"] and model.get("id") is None  # importable: no instance-bound id
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]  # what the panel tells an operator, on hover too
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["refId"] and target["expr"]
    expressions = " ".join(target["expr"] for _, target in targets(model))
    assert SHOWN <= set(re.findall(r"\bdtmf_[a-z_]+", expressions))


def substitute(expression):
    """What Grafana sends for the dashboard's variables: All jobs, and a rate window of several scrapes."""
    return expression.replace("$job", ".*").replace("$__rate_interval", "15s")


@pytest.fixture
def gateway(gateway_env, sim_url, start_gateway):
    webhook = WebhookReceiver().start()
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_METRICS_EXPORTERS": "memory,prometheus",
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
    }
    yield start_gateway(env, workers=2, threads=4)
    webhook.stop()


@pytest.fixture
def prometheus(tmp_path, gateway):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (.ci/run installs it); the dashboard's queries did not run")
    process, api = start_prometheus(tmp_path, gateway.port)
    yield api
    process.terminate()
    process.wait(10)


def traffic(url, sim, stop):
    """Answers of several outcomes, CXone attempts of several results, until stopped (bounded anyway)."""
    deadline = time.monotonic() + 60
    with requests.Session() as session:
        for i in range(3000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            if i % 7 == 3:
                sim.script(f"dtmf:limited-{i}", [{"status": 429, "headers": {"Retry-After": "1"}}] * 3)
                body = {**VALID, "interaction_id": f"limited-{i}"}
            elif i % 7 == 5:
                body = {**VALID, "interaction_id": f"missing-{i}"}
            elif i % 7 == 6:
                body = {**VALID, "digits": "x"}
            else:
                body = {**VALID, "interaction_id": f"call-{i}"}
            session.post(f"{url}/api/dtmf/parse", json=body, timeout=30)
            time.sleep(0.02)


@pytest.mark.slow
def test_every_panel_returns_data_from_a_real_prometheus_under_traffic(gateway, prometheus, sim):
    def query(expression):
        try:
            answer = requests.get(f"{prometheus}/query", params={"query": expression}, timeout=5).json()
        except requests.RequestException:
            return None
        return answer["data"]["result"] if answer.get("status") == "success" else None

    wait_until(lambda: query("up") is not None, timeout=30)
    stop = threading.Event()
    sender = threading.Thread(target=traffic, args=(gateway.url, sim, stop), daemon=True)
    sender.start()
    try:
        model = dashboard()

        # The job variable's own query (label_values(dtmf_requests_total, job)) lists the gateway's job.
        def jobs():
            params = {"match[]": "dtmf_requests_total"}
            return requests.get(f"{prometheus}/label/job/values", params=params, timeout=5).json()["data"]

        assert "dtmf" in wait_until(jobs, timeout=30)
        for title, target in targets(model):
            expression = substitute(target["expr"])

            def answered(expression=expression):
                result = query(expression)
                # Data: at least one series with a number (a quantile of no traffic would be NaN).
                return result and any(math.isfinite(float(series["value"][1])) for series in result)

            try:
                wait_until(answered, timeout=30, interval=0.5)
            except AssertionError:
                raise AssertionError(f"panel {title!r}: no data for {expression}: {query(expression)}") from None
        # The per-outcome and per-result panels show more than one line: the traffic reached them all.
        outcomes = {s["metric"]["outcome"] for s in query(substitute(
            "sum by (outcome) (rate(dtmf_requests_total[$__rate_interval])) > 0"))}  # fmt: skip
        assert {"dtmf_submitted", "validation_failed", "submission_failed"} <= outcomes
        results = {s["metric"]["result"] for s in query("sum by (result) (dtmf_cxone_attempts_total) > 0")}
        assert {"2xx", "4xx", "429"} <= results
    finally:
        stop.set()
        sender.join(30)
