"""Webhook signing (CONTRACT.md section 8, *rev 3*): several secrets for rotation, each verified by
Stripe's own library, and README's receiver example run as written against malformed headers,
stale timestamps and replays."""

import json
import time
import uuid

import pytest
import stripe

from plugins.webhook import WebhookSink, signature
from tests.helpers import ROOT, WebhookReceiver

SECRETS = ["whsec_new_2026", "whsec_old_2025"]


@pytest.fixture
def receiver():
    r = WebhookReceiver().start()
    yield r
    r.stop()


def event(**kw):
    return {"event_id": str(uuid.uuid4()), "outcome": "dtmf_submitted", **kw}


def readme_receiver():
    """README.md's receiver block, executed as written there."""
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "def receive(" in b).split("```")[0]
    namespace: dict = {}
    exec(block, namespace)
    return namespace


def test_each_post_carries_one_v1_per_secret_and_stripe_verifies_each(receiver):
    sink = WebhookSink(receiver.url, 5, SECRETS, batch_max=10)
    sink.deliver(event())
    sink.deliver_many([event(), event()])
    assert len(receiver.bodies) == 2
    for header, body in zip((h["X-DTMF-Signature"] for h in receiver.headers), receiver.bodies, strict=True):
        assert header.count("v1=") == 2
        for secret in SECRETS:  # a receiver on either secret accepts it: rotation without a gap
            assert stripe.WebhookSignature.verify_header(body.decode(), header, secret, tolerance=300)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_someone_else", tolerance=300)


def test_one_secret_signs_once_as_before(receiver):
    WebhookSink(receiver.url, 5, "only").deliver(event())
    header = receiver.headers[0]["X-DTMF-Signature"]
    assert header.count("v1=") == 1
    assert stripe.WebhookSignature.verify_header(receiver.bodies[0].decode(), header, "only", tolerance=300)


def test_readme_receiver_accepts_the_gateways_posts_once_each(receiver):
    ns = readme_receiver()
    WebhookSink(receiver.url, 5, SECRETS, batch_max=10).deliver_many([event(), event()])
    header, body = receiver.headers[0]["X-DTMF-Signature"], receiver.bodies[0]
    stored: list = []
    seen: set = set()
    for secret in SECRETS:
        assert ns["receive"](secret, header, body, seen, stored.append) == 200
    assert ns["receive"](SECRETS[0], header, body, seen, stored.append) == 200  # the same POST replayed
    assert [e["event_id"] for e in stored] == [json.loads(line)["event_id"] for line in body.splitlines()]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=,v1=",
        "t=abc,v1=00",
        "t=\u00b2,v1=00",  # a Unicode digit: str.isdigit() says yes, int() would raise
        "t=1" + "9" * 5000 + ",v1=00",
        "t=1700000000",
        "v1=00",
        "t=1700000000,v1=\u00e9\u00e9",  # non-ASCII: compare_digest on str would raise TypeError
        ",,,",
        "t=1700000000,v1",
    ],
)
def test_readme_receiver_answers_400_to_a_malformed_header_never_crashes(header):
    ns = readme_receiver()
    stored: list = []
    assert ns["receive"]("s", header, b'{"event_id":"x"}', set(), stored.append) == 400
    assert stored == []


def test_readme_receiver_refuses_a_wrong_secret_a_changed_body_and_a_stale_timestamp():
    ns = readme_receiver()
    body = json.dumps(event()).encode()
    now = int(time.time())
    receive = ns["receive"]
    assert receive("s", signature("s", now, body), body, set(), lambda e: None) == 200
    assert receive("s", signature("other", now, body), body, set(), lambda e: None) == 400
    assert receive("s", signature("s", now, body), body + b" ", set(), lambda e: None) == 400
    assert receive("s", signature("s", now - 301, body), body, set(), lambda e: None) == 400
    assert receive("s", signature("s", now + 301, body), body, set(), lambda e: None) == 400
