"""CONTRACT.md section 11: the prometheus exporter, scraped by a real Prometheus server, checked by promtool.

prometheus runs in the foreground with its own config and data dir on a free loopback port; the
machine's own service is never touched.
"""

import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import VALID
from tests.helpers import PROMETHEUS, ROOT, WebhookReceiver, start_prometheus, wait_until
from tests.integration.conftest import dialect_env

PROMTOOL = shutil.which("promtool")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="prometheus is not installed (.ci/run does)"),
]


@pytest.fixture
def gateway(tmp_path, gateway_env, sim_url, start_gateway):
    webhook = WebhookReceiver().start()
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_METRICS_EXPORTERS": "memory,prometheus",
        "DTMF_AUDIT_SINKS": "webhook",
        "DTMF_AUDIT_WEBHOOK_URL": webhook.url,
    }
    yield start_gateway(env, workers=4)
    webhook.stop()


def send(url, count):
    def one(i):
        body = VALID if i % 5 else {**VALID, "digits": "x"}  # some validation failures too
        with requests.Session() as session:
            return session.post(f"{url}/api/dtmf/parse", json=body, timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(count)))


def test_metrics_are_exact_across_workers_and_pass_promtool(gateway):
    statuses = send(gateway.url, 200)
    text = requests.get(f"{gateway.url}/metrics", timeout=10).text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['dtmf_requests_total{outcome="dtmf_submitted"}'] == statuses.count(200)
    assert samples['dtmf_requests_total{outcome="validation_failed"}'] == statuses.count(400)
    assert samples['dtmf_request_duration_seconds_count{outcome="dtmf_submitted"}'] == statuses.count(200)
    assert samples['dtmf_cxone_attempts_total{result="2xx"}'] == statuses.count(200)
    assert samples['dtmf_cxone_token_fetches_total{result="ok"}'] >= 1
    assert 'dtmf_audit_pending{sink="webhook"}' in samples
    assert 'dtmf_audit_oldest_pending_seconds{sink="webhook"}' in samples
    # kill -9 of a worker: its counts stay in the totals, the new worker's add to them.
    victim = gateway.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in gateway.worker_pids() and len(gateway.worker_pids()) == 4, timeout=20)
    more = send(gateway.url, 40)
    after = requests.get(f"{gateway.url}/metrics", timeout=10).text
    total = sum(
        float(line.rpartition(" ")[2]) for line in after.splitlines() if line.startswith("dtmf_requests_total{")
    )
    assert total == len(statuses) + len(more)


def test_a_real_prometheus_scrapes_four_workers_and_answers_queries(tmp_path, gateway):
    prometheus, base = start_prometheus(tmp_path, gateway.port)
    api = f"{base}/query"

    def query(expression):
        try:
            answer = requests.get(api, params={"query": expression}, timeout=5).json()
        except requests.RequestException:
            return None
        return answer["data"]["result"] if answer.get("status") == "success" else None

    try:
        wait_until(lambda: query("up") is not None, timeout=30)
        statuses = send(gateway.url, 300)
        time.sleep(0.5)

        def total():
            result = query("sum(dtmf_requests_total)")
            return result and float(result[0]["value"][1]) == len(statuses)

        wait_until(total, timeout=30, interval=0.5)
        p99 = query("histogram_quantile(0.99, sum by (le) (dtmf_request_duration_seconds_bucket))")
        assert p99 and float(p99[0]["value"][1]) > 0
        sinks = query("dtmf_audit_pending")
        assert sinks and {s["metric"]["sink"] for s in sinks} == {"webhook"}
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def test_alert_rules_are_valid_and_each_fires_and_stays_quiet_on_its_test_series():
    rules = ROOT / "deploy" / "prometheus"
    check = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = {line.split(":", 1)[1].strip() for line in (rules / "alerts.yml").read_text().splitlines()
              if line.strip().startswith("- alert:")}  # fmt: skip
    tests = (rules / "alerts_test.yml").read_text()
    for alert in alerts:  # every rule has a firing and a quiet case
        assert f"alertname: {alert}" in tests, alert
