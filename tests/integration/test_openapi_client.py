"""CONTRACT.md section 2 (*rev 3*): a client generated from the live OpenAPI document works against
the running service: submit, replay, 409, 503 with Retry-After, 504, both 400 shapes, 401.

openapi-python-client (a test extra) generates the client from what a real gunicorn serves, offline;
the generated package is imported and drives that gunicorn, in front of the simulator scripted for
429 and slow answers.
"""

import importlib
import json
import subprocess
import sys
import threading

import pytest
import requests

from tests.helpers import BIN, wait_until
from tests.integration.conftest import dialect_env

pytestmark = pytest.mark.slow

KEY = "client-key-0123456789abcdef"
PACKAGE = "dtmf_gateway_client"
# The operationIds, as the generator names their modules.
OPERATIONS = ("submit_dtmf", "get_metrics", "get_prometheus_metrics", "get_health", "get_open_api_document")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def gateway(gateway_env, sim_url, start_gateway):
    env = {
        **gateway_env,
        **dialect_env("tutorial", sim_url),
        "DTMF_API_KEYS": KEY,
        "DTMF_METRICS_EXPORTERS": "memory,prometheus",
        # 504 comes from a slow answer: CXone's read timeout cut short for the test.
        "DTMF_CXONE_READ_TIMEOUT_S": "3",
    }
    return start_gateway(env, workers=2, threads=4)


def generate_client(url, tmp_path):
    """Generate the client package from the served document, offline, and import it."""
    document = requests.get(f"{url}/api/openapi.json", timeout=10).json()
    (tmp_path / "openapi.json").write_text(json.dumps(document))
    (tmp_path / "generator.yml").write_text("post_hooks: []\n")  # no formatter run: nothing to fetch
    out = tmp_path / "gen" / PACKAGE
    done = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", str(tmp_path / "openapi.json"),
         "--output-path", str(out), "--meta", "none", "--config", str(tmp_path / "generator.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The generator warns when it skips part of the document: nothing may be left out.
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    sys.path.insert(0, str(out.parent))
    try:
        return importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out.parent))


@pytest.fixture
def generated(gateway, tmp_path):
    yield generate_client(gateway.url, tmp_path)
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_generated_client_drives_the_running_service(gateway, generated, sim):
    api = {name: importlib.import_module(f"{PACKAGE}.api.default.{name}") for name in OPERATIONS}
    models = importlib.import_module(f"{PACKAGE}.models")
    submit = api["submit_dtmf"].sync_detailed
    # Every status the service sends must be documented: an undocumented one raises.
    client = generated.AuthenticatedClient(base_url=gateway.url, token=KEY, timeout=30, raise_on_unexpected_status=True)

    def body(interaction_id, digits="12#"):
        return models.DTMFRequest(
            interaction_id=interaction_id, digits=digits, timeout_ms=5000, sequence_matrix_key="menu.main"
        )

    def dtmf_posts(interaction_id):
        return [r for r in sim.seen("dtmf") if r["path"].endswith(f"/interactions/{interaction_id}/dtmf")]

    # The bearer scheme is declared: the generated client sends the key; without it, 401.
    anonymous = generated.Client(base_url=gateway.url, timeout=30, raise_on_unexpected_status=True)
    refused = submit(client=anonymous, body=body("call-anon"))
    assert refused.status_code == 401 and isinstance(refused.parsed, models.Unauthorized)
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")

    # Submit: 200, our X-Request-ID echoed, our traceparent continued into the CXone call.
    first = submit(
        client=client, body=body("call-1"), idempotency_key="order-1", x_request_id="req-1",
        traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    )  # fmt: skip
    assert first.status_code == 200 and isinstance(first.parsed, models.Submitted), first.content
    assert (first.parsed.digits, first.parsed.attempts) == ("12#", 1)
    assert first.headers["X-Request-ID"] == "req-1"
    assert "Idempotent-Replayed" not in first.headers
    assert dtmf_posts("call-1")[0]["headers"]["traceparent"].split("-")[1] == TRACE_ID

    # Replay: the same answer, marked as such, and nothing sent to CXone again.
    replay = submit(client=client, body=body("call-1"), idempotency_key="order-1")
    assert replay.status_code == 200 and isinstance(replay.parsed, models.Submitted)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.parsed.to_dict() == first.parsed.to_dict()
    assert len(dtmf_posts("call-1")) == 1

    # 409: the same key while the first request is still waiting for CXone.
    sim.script("dtmf:busy-1", [{"status": 200, "body": {"status": "accepted"}, "delay_s": 2.5}])
    slow = {}
    worker = threading.Thread(
        target=lambda: slow.update(r=submit(client=client, body=body("busy-1"), idempotency_key="order-2"))
    )
    worker.start()
    wait_until(lambda: dtmf_posts("busy-1"), timeout=10)
    busy = submit(client=client, body=body("busy-1"), idempotency_key="order-2")
    worker.join(30)
    assert busy.status_code == 409 and isinstance(busy.parsed, models.IdempotencyInProgress), busy.content
    assert slow["r"].status_code == 200
    assert len(dtmf_posts("busy-1")) == 1

    # 503 with Retry-After, an integer the client can sleep on.
    sim.script("dtmf:limited-1", [{"status": 429, "headers": {"Retry-After": "3"}}] * 3)
    limited = submit(client=client, body=body("limited-1"))
    assert limited.status_code == 503 and isinstance(limited.parsed, models.SubmissionError), limited.content
    assert limited.parsed.cxone_status == 429
    assert int(limited.headers["Retry-After"]) >= 1

    # 504: CXone got the digits but answered too slowly; not re-sent.
    sim.script("dtmf:slow-1", [{"status": 200, "body": {"status": "accepted"}, "delay_s": 4.0}])
    unknown = submit(client=client, body=body("slow-1"), idempotency_key="order-3")
    assert unknown.status_code == 504 and isinstance(unknown.parsed, models.SubmissionError), unknown.content
    assert unknown.parsed.status.value == "submission_unknown" and unknown.parsed.cxone_status is None
    assert len(dtmf_posts("slow-1")) == 1
    again = submit(client=client, body=body("slow-1"), idempotency_key="order-3")
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (504, "true")

    # Both shapes of 400, told apart by the oneOf.
    failed = submit(client=client, body=body("call-2", digits="12A"))
    assert failed.status_code == 400 and isinstance(failed.parsed, models.ValidationFailed), failed.content
    bad_key = submit(client=client, body=body("call-2"), idempotency_key="k" * 256)
    assert bad_key.status_code == 400 and isinstance(bad_key.parsed, models.InvalidRequest), bad_key.content

    # The other operations, each under its operationId.
    assert isinstance(api["get_health"].sync(client=client), models.Health)
    assert isinstance(api["get_metrics"].sync(client=client), models.Metrics)
    assert "dtmf_requests_total" in api["get_prometheus_metrics"].sync_detailed(client=client).content.decode()
