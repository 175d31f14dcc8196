"""The sink test kit (CONTRACT.md section 7, *rev 3*): the contract every audit sink must meet, as a
test class a plugin team subclasses in its own CI.

It drives the sink through the gateway's real delivery engine and a real SQLite outbox in a
temporary directory, exactly as a worker does, against the team's real receiver: nothing in the
engine is mocked. What it checks:

- every event reaches the receiver exactly once while the receiver is healthy;
- events go in batches of at most AUDIT_BATCH_SIZE (through ``deliver_many`` when the sink has it);
- with the receiver down and then back, nothing is lost (at least once);
- an event the receiver refuses for good becomes a dead letter, and the events behind it still go;
- ``close()`` (when the sink has it) returns, may be called twice, and a new sink works afterwards.

Use it like this (pytest collects the subclass; the base class itself is not collected)::

    import pytest
    from dtmf_service.testing import AuditSinkContract

    class TestAcmeSink(AuditSinkContract):
        @pytest.fixture(autouse=True)
        def receiver(self, tmp_path):
            self.server = start_my_receiver(tmp_path)  # your real receiver, on loopback
            yield
            self.server.stop()

        def make_sink(self):                 # a new sink for the receiver
            return sink_from_plugin(acme_plugin, "acme", {"ACME_URL": self.server.url})
        def received_ids(self):              # event ids the receiver holds, repeats included
            return self.server.event_ids()
        def take_down(self):                 # the receiver stops answering
            self.server.stop()
        def bring_back(self):                # ... and comes back, with what it had
            self.server.start()
        def refuse_for_good(self, event):    # optional: an event the receiver will refuse for good
            return {**event, "interaction_id": "poison"}

Each method raising NotImplementedError (the default) skips the tests that need it, saying why.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from dtmf_service.audit.delivery import DeliveryEngine
from dtmf_service.audit.outbox import open_outbox
from dtmf_service.hookspecs import AuditSink, BatchAuditSink, Closeable
from dtmf_service.metrics import Metrics
from dtmf_service.pluginmanager import build_plugin_manager, resolve_sinks

__all__ = ["AuditSinkContract", "sink_from_plugin", "sample_event"]


def sink_from_plugin(plugin: object, name: str, config: Mapping[str, Any]) -> AuditSink:
    """The sink ``name`` as the gateway gets it: ``plugin`` (a module or object with hook
    implementations) registered beside the built-ins, hooks checked, the factory called with
    ``config`` (other keys at their defaults)."""
    from dtmf_service import config as cfg

    full = {key: spec.default for key, spec in cfg.KEYS.items()}
    full.update(config)
    pm = build_plugin_manager({"PLUGINS": []})
    if not pm.is_registered(plugin):
        pm.register(plugin)
        pm.check_pending()
    return resolve_sinks(pm, [name], full)[name]


def sample_event(**fields: Any) -> dict[str, Any]:
    """An audit event shaped as the gateway writes it (CONTRACT.md section 7); digits masked."""
    event = {
        "event_id": str(uuid.uuid4()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client_ip": "127.0.0.1",
        "interaction_id": "kit-" + uuid.uuid4().hex[:8],
        "digits": "****",
        "timeout_ms": 5000,
        "sequence_matrix": "menu.main",
        "node_transition": False,
        "latency_ms": 3.2,
        "cxone_status": 200,
        "cxone_response": None,
        "validation_passed": True,
        "outcome": "dtmf_submitted",
    }
    event.update(fields)
    return event


class _Recording:
    """Counts the batches the engine hands to the sink; forwards everything else unchanged."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def deliver(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append(1)
        self.sink.deliver(event)

    def close(self) -> None:
        if isinstance(self.sink, Closeable):
            self.sink.close()


class _RecordingBatch(_Recording):
    def deliver_many(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            self.calls.append(len(events))
        self.sink.deliver_many(events)  # type: ignore[attr-defined]


class AuditSinkContract:
    """Subclass as ``TestYourSink`` and provide the five methods below (see the module docstring)."""

    __test__ = False  # the base class itself is not a test; subclasses set it back (below)
    batch_size = 10  # AUDIT_BATCH_SIZE for the suite
    timeout_s = 30.0  # how long the suite waits for the receiver

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__test__" not in cls.__dict__:
            cls.__test__ = True

    # -- yours to provide ----------------------------------------------------------------------
    def make_sink(self) -> AuditSink:
        """A new sink connected to your receiver (``sink_from_plugin`` builds it as the gateway does)."""
        raise NotImplementedError

    def received_ids(self) -> list[str]:
        """The ``event_id`` of every event the receiver holds, one entry per copy received."""
        raise NotImplementedError

    def take_down(self) -> None:
        """Make the receiver unavailable (stop it, refuse connections)."""
        raise NotImplementedError

    def bring_back(self) -> None:
        """Make the receiver available again, keeping what it had received."""
        raise NotImplementedError

    def refuse_for_good(self, event: dict[str, Any]) -> dict[str, Any]:
        """An event (made from ``event``) that the receiver refuses for good, so that the sink
        raises DeliveryRejected (or reports it rejected in DeliveryIncomplete)."""
        raise NotImplementedError

    # -- the engine ----------------------------------------------------------------------------
    @pytest.fixture
    def engine(self) -> Iterator[Callable[..., tuple[DeliveryEngine, Any, _Recording]]]:
        """``engine()`` -> (a started delivery engine, its outbox, the recorded sink)."""
        made: list[tuple[DeliveryEngine, Any]] = []
        directory = tempfile.mkdtemp(prefix="dtmf-sink-kit-")

        def start(events: list[dict[str, Any]] = ()) -> tuple[DeliveryEngine, Any, _Recording]:  # type: ignore[assignment]
            sink = self.make_sink()
            recorded = _RecordingBatch(sink) if isinstance(sink, BatchAuditSink) else _Recording(sink)
            config = self._config(directory)
            outbox = open_outbox(config, ["kit"])
            self._commit(outbox, events)
            engine = DeliveryEngine({"kit": recorded}, outbox, config, Metrics(os.path.join(directory, "metrics")))
            engine.start()
            made.append((engine, outbox))
            return engine, outbox, recorded

        yield start
        for engine, outbox in made:
            engine.stop(5.0)
            outbox.close()

    def _config(self, directory: str) -> dict[str, Any]:
        return {
            "AUDIT_SPOOL_DIR": directory,
            "AUDIT_OUTBOX": None,
            "AUDIT_SPOOL_MAX_MB": 512.0,
            "AUDIT_OUTBOX_FSYNC": False,
            "AUDIT_BATCH_SIZE": self.batch_size,
            "AUDIT_BATCH_WAIT_S": 0.01,
            "AUDIT_RETRY_ATTEMPTS": 2,
            "AUDIT_BACKOFF_BASE_S": 0.05,
            "AUDIT_BACKOFF_MAX_S": 0.5,
            "AUDIT_LEASE_S": 30.0,
        }

    def _commit(self, outbox: Any, events: list[dict[str, Any]]) -> None:
        """As the request path does: into the journal, then (the writer thread) into the outbox."""
        for event in events:
            outbox.commit(event)
        assert outbox.flush(self.timeout_s), "the outbox did not take the events"

    def _wait(self, what: str, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"sink contract: {what} within {self.timeout_s} s")

    def _needs(self, method: Callable[..., Any], *args: Any) -> Any:
        try:
            return method(*args)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not provide {method.__name__}()")

    def _arrived(self, ids: set[str]) -> None:
        """Delivered is not yet readable everywhere (a syslog daemon writes its file a moment later)."""
        try:
            self._wait("every delivered event readable at the receiver", lambda: ids <= set(self.received_ids()))
        except AssertionError:
            missing = ids - set(self.received_ids())
            raise AssertionError(f"sink contract: {len(missing)} delivered event(s) missing at the receiver") from None

    @staticmethod
    def _pending(outbox: Any) -> int:
        return sum(b.pending for b in outbox.backlog().values())

    # -- the contract --------------------------------------------------------------------------
    def test_every_event_arrives_exactly_once_while_the_receiver_is_healthy(self, engine: Any) -> None:
        events = [sample_event() for _ in range(3 * self.batch_size + 1)]
        _, outbox, _ = engine(events)
        sent = sorted(e["event_id"] for e in events)
        self._wait("every event delivered", lambda: self._pending(outbox) == 0)
        self._arrived(set(sent))
        assert sorted(i for i in self.received_ids() if i in set(sent)) == sent, "an event arrived twice"

    def test_events_go_in_batches_of_at_most_the_batch_size(self, engine: Any) -> None:
        events = [sample_event() for _ in range(2 * self.batch_size + 3)]
        _, outbox, recorded = engine(events)
        self._wait("every event delivered", lambda: self._pending(outbox) == 0)
        assert recorded.calls and max(recorded.calls) <= self.batch_size
        if isinstance(recorded, _RecordingBatch):
            assert max(recorded.calls) > 1, "a batch sink was never given more than one event at once"
        self._arrived({e["event_id"] for e in events})

    def test_a_receiver_down_then_back_loses_nothing(self, engine: Any) -> None:
        delivery, outbox, recorded = engine()
        self._needs(self.take_down)
        events = [sample_event() for _ in range(self.batch_size + 5)]
        self._commit(outbox, events)
        delivery.notify()
        self._wait("a delivery attempt while the receiver is down", lambda: bool(recorded.calls))
        assert self._pending(outbox) > 0, "events counted delivered while the receiver was down"
        self._needs(self.bring_back)
        delivery.notify()
        self._wait("every event delivered once the receiver is back", lambda: self._pending(outbox) == 0)
        self._arrived({e["event_id"] for e in events})

    def test_an_event_refused_for_good_becomes_a_dead_letter_and_blocks_nothing(self, engine: Any) -> None:
        good = [sample_event() for _ in range(self.batch_size)]
        poison = self._needs(self.refuse_for_good, sample_event())
        events = [*good[:3], poison, *good[3:]]
        _, outbox, _ = engine(events)
        self._wait("the refused event set aside", lambda: self._pending(outbox) == 0)
        letters = outbox.dead_letters("kit")
        assert [letter["event_id"] for letter in letters] == [poison["event_id"]]
        self._arrived({e["event_id"] for e in good})  # the events behind the refused one were not blocked
        assert poison["event_id"] not in self.received_ids()

    def test_close_returns_may_repeat_and_a_new_sink_works_after(self, engine: Any) -> None:
        unused = self.make_sink()
        if isinstance(unused, Closeable):
            unused.close()  # never used: still fine
        delivery, outbox, recorded = engine([sample_event()])
        self._wait("the event delivered", lambda: self._pending(outbox) == 0)
        started = time.monotonic()
        delivery.stop(5.0)  # calls close()
        if isinstance(recorded.sink, Closeable):
            recorded.sink.close()  # twice
        assert time.monotonic() - started < 10, "close() hung"
        again = [sample_event()]
        _, second, _ = engine(again)
        self._wait("a new sink delivers after close()", lambda: self._pending(second) == 0)
        self._arrived({again[0]["event_id"]})
