"""CONTRACT.md section 3: one token per process, single flight, 30 s margin, shared failure."""

import threading
import time

import pytest

from dtmf_service.cxone.tokens import TokenCache, TokenError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def gated_fetch(outcome):
    """A fetch that blocks until released, counting its calls; returns or raises ``outcome``."""
    calls, release = [], threading.Event()

    def fetch(timeout_s):
        calls.append(1)
        release.wait(5)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return fetch, calls, release


def get_from_threads(cache, count, release):
    """``count`` threads call cache.get() while the first fetch is held; their results or errors."""
    outcomes = []

    def worker():
        try:
            outcomes.append(cache.get())
        except TokenError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread is now inside get(): the leader fetching, the rest waiting on it
    release.set()
    for t in threads:
        t.join(5)
    return outcomes


def test_fifty_concurrent_first_requests_cause_one_fetch():
    fetch, calls, release = gated_fetch(("tok", 3600))
    assert get_from_threads(TokenCache(fetch), 50, release) == ["tok"] * 50
    assert len(calls) == 1


def test_waiters_share_the_failure_of_the_one_fetch():
    fetch, calls, release = gated_fetch(TokenError("authentication with CXone failed"))
    assert get_from_threads(TokenCache(fetch), 20, release) == ["authentication with CXone failed"] * 20
    assert len(calls) == 1


def test_failure_is_not_cached_the_next_request_tries_again():
    answers = iter([TokenError("down"), ("tok", 3600)])

    def fetch(timeout_s):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    cache = TokenCache(fetch)
    with pytest.raises(TokenError):
        cache.get()
    assert cache.get() == "tok"


def test_token_reused_until_thirty_seconds_before_expiry():
    clock = Clock()
    tokens = iter(["t1", "t2"])
    cache = TokenCache(lambda _t: (next(tokens), 100), margin_s=30, clock=clock)
    assert cache.get() == "t1"
    clock.now += 69.9
    assert cache.get() == "t1"
    clock.now += 0.2  # now 70.1 s in: inside the 30 s margin
    assert cache.get() == "t2"


def test_invalidate_drops_only_the_stale_token():
    tokens = iter(["t1", "t2", "t3"])
    cache = TokenCache(lambda _t: (next(tokens), 3600))
    assert cache.get() == "t1"
    cache.invalidate("t1")
    assert cache.get() == "t2"
    cache.invalidate("t1")  # a second thread's late 401 for the old token must not drop the new one
    assert cache.get() == "t2"


def test_unexpected_fetch_error_becomes_token_error_without_detail():
    def fetch(timeout_s):
        raise ValueError("secret=hunter2")

    with pytest.raises(TokenError) as info:
        TokenCache(fetch).get()
    assert "hunter2" not in str(info.value)


def test_token_shorter_lived_than_the_margin_is_used_for_half_its_life():
    clock = Clock()
    tokens = iter(["t1", "t2"])
    cache = TokenCache(lambda _t: (next(tokens), 20), margin_s=30, clock=clock)
    assert cache.get() == "t1"
    clock.now += 9.9
    assert cache.get() == "t1"
    clock.now += 0.2
    assert cache.get() == "t2"


def test_a_waiter_gives_up_at_its_own_deadline_while_the_fetch_hangs():
    fetch, calls, release = gated_fetch(("tok", 3600))
    cache = TokenCache(fetch)
    leader = threading.Thread(target=cache.get)
    leader.start()
    time.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(TokenError, match="timed out"):
        cache.get(timeout_s=0.2)
    assert time.monotonic() - started < 1.0
    release.set()
    leader.join(5)
    assert cache.get() == "tok" and len(calls) == 1


def test_a_failing_metrics_write_never_strands_the_shared_fetch():
    """Issue 17 item 7: the fetch's metrics write raising (full disk, broken exporter) must neither
    fail the fetch nor leave the flight open, where every later caller would wait out its deadline."""

    def broken_counter(result):
        raise OSError("No space left on device")

    tokens = iter(["t1", "t2"])
    cache = TokenCache(lambda _t: (next(tokens), 3600), on_fetch=broken_counter)
    assert cache.get(timeout_s=0.5) == "t1"
    cache.invalidate("t1")
    started = time.monotonic()
    assert cache.get(timeout_s=0.5) == "t2"  # a new fetch, not a wait on a stranded one
    assert time.monotonic() - started < 0.4


def test_a_failing_metrics_write_after_a_failed_fetch_still_releases_the_waiters():
    def broken_counter(result):
        raise RuntimeError("exporter down")

    fetch, calls, release = gated_fetch(TokenError("authentication with CXone failed"))
    cache = TokenCache(fetch, on_fetch=broken_counter)
    assert get_from_threads(cache, 5, release) == ["authentication with CXone failed"] * 5
    started = time.monotonic()
    with pytest.raises(TokenError, match="authentication"):
        cache.get(timeout_s=0.5)  # the next caller leads a new fetch at once
    assert time.monotonic() - started < 0.4 and len(calls) == 2
