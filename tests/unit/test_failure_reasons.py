"""A failure's reason is kept (CONTRACT.md section 7, *rev 3*): the exception's message, scrubbed of
digits, secrets and tokens and cut to 200 characters, with the webhook's HTTP status, in the warning
log line and the dead letter; a real webhook receiver and a real SQLite outbox."""

import logging
import uuid

import pytest

from dtmf_service import DeliveryRejected
from dtmf_service.audit.delivery import SinkDelivery
from dtmf_service.audit.outbox_sqlite import SqliteOutbox
from dtmf_service.audit.reasons import MAX_CHARS, FailureReasons
from dtmf_service.metrics import Metrics
from plugins.webhook import WebhookSink
from tests.helpers import WebhookReceiver, wait_until

CONFIG = {
    "AUDIT_BATCH_SIZE": 50,
    "AUDIT_BATCH_WAIT_S": 0.01,
    "AUDIT_RETRY_ATTEMPTS": 1,
    "AUDIT_BACKOFF_BASE_S": 0.01,
    "AUDIT_BACKOFF_MAX_S": 0.05,
    "AUDIT_LEASE_S": 30.0,
    "AUDIT_WEBHOOK_SECRET": ["whsec-rotating-secret"],
    "CXONE_CLIENT_SECRET": "cxone-client-secret",
}


def test_the_reason_keeps_words_and_the_http_status_and_hides_digits_secrets_and_tokens():
    reasons = FailureReasons.from_config(CONFIG)
    exc = DeliveryRejected(
        "HTTP 422: digits 4111111111111111 refused; cvv 737, menu 12;\n token=abc.def password: hunter22"
        " https://user:pw@h.example/x?sig=QSTOKEN Bearer eyJhbGciOi cxone-client-secret whsec-rotating-secret"
    )
    text = reasons.describe(exc)
    assert text.startswith("DeliveryRejected: HTTP 422: digits *** refused; cvv ***, menu 12;")
    for leaked in ("4111", "737", "abc.def", "hunter22", "user:pw", "QSTOKEN", "eyJhbGciOi", "cxone-client", "whsec-"):
        assert leaked not in text
    assert "\n" not in text and len(text) <= MAX_CHARS
    assert len(reasons.describe(RuntimeError("x" * 1000))) == MAX_CHARS


def make_event():
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted"}


@pytest.mark.parametrize("batch_max", [1, 50])
def test_a_webhook_refusal_keeps_its_http_status_in_the_log_and_the_dead_letter(tmp_path, caplog, batch_max):
    receiver = WebhookReceiver().start()
    try:
        box = SqliteOutbox(str(tmp_path / "outbox.db"), ("webhook",), 1 << 30)
        poison, good = make_event(), make_event()
        receiver.reject_ids.add(poison["event_id"])
        for event in (poison, good):
            box.commit(event)
        assert box.flush(5)
        sink = WebhookSink(receiver.url, 5, None, batch_max=batch_max)
        delivery = SinkDelivery("webhook", sink, box, CONFIG, Metrics(str(tmp_path / "metrics")))
        with caplog.at_level(logging.WARNING, logger="dtmf_service.audit"):
            wait_until(lambda: delivery.step("t") is not None and box.backlog()["webhook"].dead_letters == 1)
        (letter,) = box.dead_letters("webhook")
        assert letter["reason"] == "refused by the receiver: DeliveryRejected: webhook refused the event (HTTP 400)"
        assert any("delivery failed: DeliveryRejected: webhook refused the event (HTTP 400)" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert receiver.ids() == [good["event_id"]]
        backlog = box.backlog()["webhook"]  # what `audit status` shows as the sink's last error
        assert backlog.last_error == "DeliveryRejected: webhook refused the event (HTTP 400)"
        assert backlog.last_error_at is not None
        box.close()
    finally:
        receiver.stop()


def test_a_down_receiver_is_logged_with_its_cause(tmp_path, caplog, closed_port):
    box = SqliteOutbox(str(tmp_path / "outbox.db"), ("webhook",), 1 << 30)
    box.commit(make_event())
    assert box.flush(5)
    sink = WebhookSink(f"http://127.0.0.1:{closed_port}/audit", 2, None, batch_max=50)
    delivery = SinkDelivery("webhook", sink, box, CONFIG, Metrics(str(tmp_path / "metrics")))
    with caplog.at_level(logging.WARNING, logger="dtmf_service.audit"):
        delivery.step("t")
    messages = [r.getMessage() for r in caplog.records]
    assert any("delivery failed: NewConnectionError" in m or "delivery failed: MaxRetryError" in m for m in messages), (
        messages
    )
    box.close()
