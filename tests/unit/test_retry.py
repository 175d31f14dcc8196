"""Pure retry rules: backoff with full jitter, Retry-After in both forms."""

import email.utils

import pytest

from dtmf_service.cxone.retry import backoff_delay, is_retryable_status, parse_retry_after
from tests.conftest import VALID


@pytest.mark.parametrize("status", [429, 503])
def test_retryable_statuses(status):
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 400, 401, 404, 500, 502, 504])
def test_not_retryable_statuses(status):
    assert not is_retryable_status(status)


def test_backoff_grows_exponentially_with_full_jitter():
    assert [backoff_delay(n, 1.0, 100.0, rand=lambda: 1.0) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(3, 1.0, 100.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(2, 1.0, 100.0, rand=lambda: 0.5) == 2.0


def test_backoff_is_capped():
    assert backoff_delay(50, 1.0, 8.0, rand=lambda: 1.0) == 8.0
    assert backoff_delay(10_000, 1.0, 8.0, rand=lambda: 1.0) == 8.0


def test_retry_after_seconds():
    assert parse_retry_after("3", now=0, cap_s=8) == 3.0
    assert parse_retry_after("0", now=0, cap_s=8) == 0.0


def test_retry_after_is_capped():
    assert parse_retry_after("3600", now=0, cap_s=8) == 8.0


def test_retry_after_http_date():
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 5, usegmt=True)
    assert parse_retry_after(header, now=now, cap_s=8) == pytest.approx(5.0)


def test_retry_after_date_in_the_past_is_zero_not_negative():
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now, cap_s=8) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2026"])
def test_unreadable_retry_after_is_ignored(value):
    assert parse_retry_after(value, now=0, cap_s=8) is None


@pytest.mark.parametrize(
    "value",
    [
        "\u00b2",  # a superscript two: str.isdigit() says yes, int() says no
        "\u0967\u0968",  # Devanagari digits
        "9" * 5000,  # beyond int()'s 4,300-digit limit
        "1" * 11,
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Sat, 01 Jan 10000 00:00:00 GMT",
        "Fri, 31 Dec 99999999999 23:59:59 GMT",  # OverflowError inside the date parser
        "Thu, 01 Jan 1970 00:00:00 +9999",
        "\x00",
    ],
)
def test_a_retry_after_that_cannot_be_read_counts_as_absent(value):
    """CONTRACT.md section 3 rev 3: however odd, never an exception (which became a 500)."""
    assert parse_retry_after(value, now=1_800_000_000.0, cap_s=8) is None


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_an_unreadable_retry_after_from_cxone_is_a_503_not_a_500(make_app, upstream_config, sim, value):
    """Through the real client and a real HTTP answer: CXone rate limits with an odd header."""
    sim.script("dtmf:call-1", [{"status": 429, "headers": {"Retry-After": value}}] * 3)
    app = make_app(**upstream_config, CXONE_BACKOFF_BASE_S=0.01, CXONE_BACKOFF_MAX_S=0.02)
    response = app.test_client().post("/api/dtmf/parse", json=VALID)
    assert (response.status_code, response.get_json()["status"]) == (503, "submission_failed")
    assert response.headers["Retry-After"].isdigit()
