"""The service's life around its workers, the same under every server (gunicorn, granian).

A server's master (or launcher) calls, in this order:

- ``starting()`` before any worker exists: files the service creates are private (umask 077), the
  shared metrics directory is made and wiped (totals start from zero), the configuration and every
  plugin are checked (a bad one stops the start with one line, exit 4), the API keys file is read
  and held (workers inherit the keys), the idempotency store and the audit outbox are prepared
  (legacy spool imported once), and the host's audit delivery process is started and supervised;
- ``reloading()`` at a reload (SIGHUP), before the new workers: the keys file is read again (a bad
  file keeps the old keys), and the delivery process is replaced, so an upgraded sink plugin is
  the one that delivers;
- ``worker_exited(pid)`` when a worker has gone, however it went: its counters are folded into the
  archive (a server that cannot tell, granian, is covered by a sweep of dead processes' files);
- ``stopping()`` last: the delivery process is stopped (what it holds goes back by lease).

Workers learn that they run under the lifecycle from DTMF_LIFECYCLE, which ``starting`` sets, and
that delivery is the host's process's job from DTMF_DELIVERY. ``app.py`` refuses to serve without
the first (uWSGI, ``gunicorn app:app`` without gunicorn.conf.py): a server that ran none of this
would serve without journal recovery, delivery or exact metrics.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from dtmf_service import config as cfg
from dtmf_service.metrics import counters
from dtmf_service.processes import pid_alive

LIFECYCLE_ENV = "DTMF_LIFECYCLE"  # the master's pid: set for every process started under it
DELIVERY_ENV = "DTMF_DELIVERY"  # "process": the host's delivery process delivers; workers only write
DELIVERY_MODULE = "dtmf_service.wiring.delivery_process"
FLUSH_S = 10.0  # how long a stopping delivery process may take to hand its batches over

_RESPAWN_MIN_S, _RESPAWN_MAX_S = 1.0, 30.0
_HEALTHY_AFTER_S = 10.0  # a delivery process that lived this long starts the back-off again
_SWEEP_S = 5.0


class LifecycleError(Exception):
    """The configuration or a plugin is bad: the service must not start (exit 4)."""


def under_lifecycle() -> bool:
    """Whether this process was started by a master that ran ``starting()``."""
    return bool(os.environ.get(LIFECYCLE_ENV))


def delivery_in_process() -> bool:
    """Whether this process delivers its own audit events (tests, ``flask run``), rather than the
    host's delivery process."""
    return os.environ.get(DELIVERY_ENV) != "process"


def probe_config() -> dict[str, Any]:
    """The configuration the workers will load (environment and DTMF_CONFIG_FILE), finished."""
    probe: dict[str, Any] = {}
    cfg.load_sources(probe)
    cfg.finalise(probe)
    return probe


def request_timeout_s() -> int:
    """Above CONTRACT.md section 3's longest request, with room: the servers' worker timeout and the
    wait for a stopping worker's last request. A bad configuration falls back to the defaults here
    (``starting`` reports it)."""
    try:
        probe = probe_config()
    except cfg.ConfigError:
        probe = {k: key.default for k, key in cfg.KEYS.items()}
    return int(cfg.request_deadline_s(probe) + 10)


class ServiceLifecycle:
    """What a master does for the service, whichever server it is (see the module's text)."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("dtmf_service")
        self.metrics_dir = ""
        self.delivery: DeliverySupervisor | None = None
        self._fold_lock = threading.Lock()  # child_exit and the sweep fold into one archive

    def starting(self) -> None:
        # Every file the service creates is the service user's alone (CONTRACT.md section 8, rev 3),
        # whatever umask it was started with; AUDIT_FILE_MODE widens the audit file only.
        os.umask(0o077)
        directory = os.environ.get("DTMF_METRICS_DIR")
        if not directory:
            directory = tempfile.mkdtemp(prefix="dtmf-metrics-")
            os.environ["DTMF_METRICS_DIR"] = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        counters.wipe(directory)
        self.metrics_dir = directory
        probe = self._checked_config()
        os.environ[LIFECYCLE_ENV] = str(os.getpid())
        self._set_delivery(probe)
        threading.Thread(target=self._sweep_forever, name="dtmf-counters-sweep", daemon=True).start()

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(_SWEEP_S)
            try:
                self.sweep()
            except OSError as exc:
                self.log.error("dtmf-gateway: counters sweep failed: %s", exc)

    def _checked_config(self) -> dict[str, Any]:
        from dtmf_service.audit.outbox import open_outbox
        from dtmf_service.idempotency import Idempotency
        from dtmf_service.pluginmanager import check_plugins_isolated
        from dtmf_service.web import apikeys

        try:
            probe = probe_config()
            if probe["API_KEYS_FILE"]:
                # Read here, in the master: the workers inherit the keys, and a reload with a bad
                # file keeps the old ones (reloading) instead of every new worker exiting.
                apikeys.hold(probe["API_KEYS_FILE"])
            # In a child process: a plugin imported here would stay in every forked worker, and a
            # reload would never run a newly installed version.
            check_plugins_isolated()
            # Prepared once here, so that the workers do not all race to create them.
            Idempotency.from_config(probe).close()
            if probe["AUDIT_SINKS"]:
                outbox = open_outbox(probe, probe["AUDIT_SINKS"])
                outbox.import_legacy_spool()  # an earlier version's spool, before any worker exists
                outbox.close()
        except (cfg.ConfigError, apikeys.KeysError) as exc:
            raise LifecycleError(str(exc)) from None
        return probe

    def _set_delivery(self, probe: dict[str, Any]) -> None:
        if probe["AUDIT_SINKS"]:
            os.environ[DELIVERY_ENV] = "process"
            if self.delivery is None:
                self.delivery = DeliverySupervisor(self.log, self._fold)
                self.delivery.start()
            else:
                self.delivery.replace()
        else:
            os.environ.pop(DELIVERY_ENV, None)
            if self.delivery is not None:
                self.delivery.stop(FLUSH_S)
                self.delivery = None

    def reloading(self) -> None:
        from dtmf_service.web import apikeys

        apikeys.reload_held(self.log)
        try:
            probe = probe_config()
        except cfg.ConfigError as exc:
            # The new workers will say so too; the delivery process keeps going as it is.
            self.log.error("dtmf-gateway: reload: configuration error: %s", exc)
            return
        self._set_delivery(probe)

    def worker_exited(self, pid: int) -> None:
        self._fold(pid)

    def sweep(self) -> None:
        """Fold the counters of every process of ours that is gone (for a server without a
        per-worker exit hook; harmless beside one)."""
        for pid in counters.process_pids(self.metrics_dir):
            if not pid_alive(pid):
                self._fold(pid)

    def _fold(self, pid: int) -> None:
        if not self.metrics_dir:
            return
        with self._fold_lock:
            try:
                counters.fold_dead(self.metrics_dir, pid)
            except OSError as exc:
                self.log.error("dtmf-gateway: could not fold the counters of process %d: %s", pid, exc)

    def stopping(self) -> None:
        if self.delivery is not None:
            self.delivery.stop(FLUSH_S)
            self.delivery = None


_master: ServiceLifecycle | None = None


def master_lifecycle(log: logging.Logger | None = None) -> ServiceLifecycle:
    """The master process's one lifecycle: gunicorn executes its configuration file again at every
    reload, so the state (the delivery process, the metrics directory) lives here, not there."""
    global _master
    if _master is None:
        _master = ServiceLifecycle(log)
    return _master


class DeliverySupervisor:
    """Keeps one audit delivery process running for the host (``python -m`` DELIVERY_MODULE).

    Started by the master: a delivery process that dies is started again (with a back-off when it
    keeps dying), and its counters are folded. The process stops on SIGTERM, and by itself when
    its parent is gone (a SIGKILLed master leaves no delivery process behind)."""

    def __init__(self, log: logging.Logger, fold: Any) -> None:
        self.log = log
        self._fold = fold
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        with self._lock:
            self._proc = self._spawn()
        self._thread = threading.Thread(target=self._watch, name="dtmf-delivery-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._started = time.monotonic()
        return subprocess.Popen(
            [sys.executable, "-m", DELIVERY_MODULE],
            env=dict(os.environ),
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )

    def replace(self) -> None:
        """A reload: the new process first, then the old one stops (leases make two safe)."""
        with self._lock:
            old, self._proc = self._proc, self._spawn()
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()

    def _retire(self, proc: subprocess.Popen[bytes], timeout_s: float = FLUSH_S) -> None:
        """SIGTERM (the process hands its batches over), SIGKILL after ``timeout_s`` and 5 s more."""
        proc.terminate()
        try:
            proc.wait(timeout_s + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._fold(proc.pid)

    def _watch(self) -> None:
        delay = _RESPAWN_MIN_S
        while not self._stopping.wait(0.5):
            with self._lock:
                proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            self._fold(proc.pid)
            lived = time.monotonic() - self._started
            delay = _RESPAWN_MIN_S if lived >= _HEALTHY_AFTER_S else min(delay * 2, _RESPAWN_MAX_S)
            self.log.error(
                "dtmf-gateway: the audit delivery process exited (code %s); starting another in %.0f s",
                proc.returncode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._proc is proc:
                    self._proc = self._spawn()

    def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2)
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            self._retire(proc, timeout_s)
