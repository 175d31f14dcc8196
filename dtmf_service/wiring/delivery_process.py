"""The host's audit delivery process: ``python -m dtmf_service.wiring.delivery_process``.

Started and supervised by the master (lifecycle.py), one per host whatever the server and the
number of workers. Workers only write events into the outbox; here the sinks' threads claim,
deliver and acknowledge, and maintenance recovers the placeholders of dead requests and keeps the
outbox under its bound (audit/delivery.py). Delivery threads in every worker competed with request
threads for each worker's GIL; here they compete with nothing.

SIGTERM or SIGINT: stop taking batches, let the ones in flight finish (FLUSH_S at most), exit 0;
what is still leased goes back to the outbox when the lease lapses. SIGHUP is the master's business
(it replaces this process). The process exits by itself when its parent is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from dtmf_service import _configure_logging
from dtmf_service.config import ConfigError
from dtmf_service.wiring import build_delivery
from dtmf_service.wiring.lifecycle import FLUSH_S, LIFECYCLE_ENV, probe_config

log = logging.getLogger("dtmf_service.audit")


def main() -> int:
    os.umask(0o077)
    # The master's pid from the lifecycle, not getppid(): a master killed while this process was
    # still starting would otherwise leave it believing init is its master.
    parent = int(os.environ.get(LIFECYCLE_ENV) or os.getppid())
    try:
        config = probe_config()
    except ConfigError as exc:
        print(f"dtmf-gateway: audit delivery: configuration error: {exc}", file=sys.stderr, flush=True)
        return 4
    _configure_logging(config["LOG_LEVEL"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    engine, outbox = build_delivery(config)
    engine.start()
    log.info("audit delivery process %d started for sinks %s", os.getpid(), ", ".join(engine.sinks))
    while not stop.is_set():
        if os.getppid() != parent:
            log.error("audit delivery process %d: the server's master is gone; stopping", os.getpid())
            break
        stop.wait(1.0)
    engine.stop(FLUSH_S)
    outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
