"""CONTRACT.md section 7: hooks, plugin registration, isolation of failing plugins."""

import inspect
import subprocess
import sys
import textwrap

import pytest

from dtmf_service import config as cfg
from dtmf_service import hookspecs
from tests.conftest import VALID
from tests.helpers import ROOT, wait_until

THIS_FILE = inspect.getsource(sys.modules[__name__])


def hook_names():
    return sorted(name for name, value in vars(hookspecs).items() if name.startswith("dtmf_") and callable(value))


def test_every_hook_has_a_test():
    # datasette's meta-test: a hook added without a test named after it fails here.
    for name in hook_names():
        assert f"def test_hook_{name}" in THIS_FILE, f"no test_hook_{name}"


def test_hooks_are_firstresult_and_prefixed():
    for name in hook_names():
        opts = getattr(getattr(hookspecs, name), "dtmf_service_spec")
        # Factories answer once (firstresult); declarations are collected from every plugin.
        assert opts["firstresult"] is (name != "dtmf_config_keys")


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """Writes a plugin module into a folder on sys.path; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    counter = iter(range(1000))

    def write(source):
        name = f"test_plugin_{next(counter)}_{tmp_path.name.replace('-', '_')}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


COLLECTING = """
    from dtmf_service import hookimpl
    EVENTS = []

    class Sink:
        def deliver(self, event):
            EVENTS.append(event)

    class Exporter:
        def record(self, event):
            EVENTS.append(("metric", event["outcome"]))

    @hookimpl
    def dtmf_audit_sink(name, config):
        return Sink() if name == "collect" else None

    @hookimpl
    def dtmf_metrics_exporter(name, config):
        return Exporter() if name == "collect" else None
"""


def test_hook_dtmf_audit_sink(make_app, plugin_module):
    name = plugin_module(COLLECTING)
    app = make_app(PLUGINS=[name], AUDIT_SINKS=["collect"])
    answer = app.test_client().post("/api/dtmf/parse", json=VALID).get_json()
    app.extensions["dtmf"].delivery.flush(5)
    events = [e for e in sys.modules[name].EVENTS if isinstance(e, dict)]
    assert [e["outcome"] for e in events] == ["dtmf_submitted"]
    # The audit record holds the latency the caller was told, not a later reading of the clock.
    assert events[0]["latency_ms"] == answer["latency_ms"]


def test_hook_dtmf_metrics_exporter(make_app, plugin_module):
    name = plugin_module(COLLECTING)
    app = make_app(PLUGINS=[name], METRICS_EXPORTERS=["memory", "collect"])
    app.test_client().post("/api/dtmf/parse", json={**VALID, "digits": "bad"})
    assert sys.modules[name].EVENTS == [("metric", "validation_failed")]


def test_failing_exporter_and_sink_never_affect_others_or_the_caller(make_app, plugin_module):
    broken = plugin_module("""
        from dtmf_service import hookimpl

        class Broken:
            def deliver(self, event):
                raise RuntimeError("sink down")
            def record(self, event):
                raise RuntimeError("exporter down")

        @hookimpl
        def dtmf_audit_sink(name, config):
            return Broken() if name == "broken" else None

        @hookimpl
        def dtmf_metrics_exporter(name, config):
            return Broken() if name == "broken" else None
    """)
    good = plugin_module(COLLECTING)
    app = make_app(
        PLUGINS=[broken, good],
        AUDIT_SINKS=["broken", "collect"],
        METRICS_EXPORTERS=["broken", "memory", "collect"],
        AUDIT_RETRY_ATTEMPTS=1,
    )
    client = app.test_client()
    assert client.post("/api/dtmf/parse", json=VALID).status_code == 200
    events = sys.modules[good].EVENTS
    wait_until(lambda: any(isinstance(e, dict) for e in events), timeout=5)  # "broken" keeps failing meanwhile
    assert client.get("/api/metrics").get_json()["successful_parses"] == 1
    assert ("metric", "dtmf_submitted") in events
    assert any(isinstance(e, dict) for e in events)


def test_misspelt_hook_stops_start_up(make_app, plugin_module):
    name = plugin_module("""
        from dtmf_service import hookimpl

        @hookimpl
        def dtmf_audit_snk(name, config):
            return None
    """)
    with pytest.raises(cfg.ConfigError, match="PLUGINS"):
        make_app(PLUGINS=[name])


def test_unimportable_plugin_module_stops_start_up(make_app):
    with pytest.raises(cfg.ConfigError, match="PLUGINS: cannot import 'no_such_module_x'"):
        make_app(PLUGINS=["no_such_module_x"])


def test_sink_without_deliver_is_refused(make_app, plugin_module):
    name = plugin_module("""
        from dtmf_service import hookimpl

        @hookimpl
        def dtmf_audit_sink(name, config):
            return object() if name == "odd" else None
    """)
    with pytest.raises(cfg.ConfigError, match="without deliver"):
        make_app(PLUGINS=[name], AUDIT_SINKS=["odd"])


def pip_install(target, source):
    """A plain (non-editable) ``pip install --target``, offline: no dependencies, no build isolation."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )


def test_builtin_plugins_resolve_from_an_installed_package(tmp_path):
    """A plain (non-editable) install finds the built-ins as dtmf_service.builtin_plugins."""
    target = tmp_path / "site"
    pip_install(target, ROOT)
    code = (
        "import dtmf_service.builtin_plugins.file as f, dtmf_service;"
        f"print(f.__file__.startswith({str(target)!r}), dtmf_service.__file__.startswith({str(target)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["True", "True"]
    assert not (target / "plugins").exists()  # the generic name "plugins" is never installed top-level


def test_third_party_plugin_through_its_entry_point(tmp_path):
    """A plugin package installed with pip, found through the dtmf_service entry-point group."""
    package = tmp_path / "acme_sink"
    (package / "acme_sink").mkdir(parents=True)
    (package / "acme_sink" / "__init__.py").write_text(
        textwrap.dedent("""
        from dtmf_service import hookimpl

        class AcmeSink:
            def deliver(self, event):
                print("ACME", event["outcome"], flush=True)

        @hookimpl
        def dtmf_audit_sink(name, config):
            return AcmeSink() if name == "acme" else None
    """)
    )
    (package / "setup.cfg").write_text(
        textwrap.dedent("""
        [metadata]
        name = acme-dtmf-sink
        version = 1.0

        [options]
        packages = acme_sink

        [options.entry_points]
        dtmf_service =
            acme = acme_sink
    """)
    )
    (package / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    )
    target = tmp_path / "site"
    pip_install(target, package)
    script = textwrap.dedent(f"""
        from dtmf_service import create_app
        app = create_app({{"AUDIT_SINKS": ["acme"], "METRICS_DIR": {str(tmp_path / "m")!r},
                          "AUDIT_SPOOL_DIR": {str(tmp_path / "s")!r},
                          "IDEMPOTENCY_STORE": "sqlite:///{tmp_path / "i.db"}"}})
        r = app.test_client().post("/api/dtmf/parse", json={VALID!r})
        app.extensions["dtmf"].delivery.flush(5)
        app.extensions["dtmf"].close(5)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={"PYTHONPATH": f"{target}:{ROOT}"}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "ACME dtmf_submitted" in out.stdout


def test_hook_dtmf_config_keys(make_app, plugin_module):
    from dtmf_service.config import ConfigError

    name = plugin_module("""
        from dtmf_service import hookimpl

        @hookimpl
        def dtmf_config_keys():
            return ["ACME_SINK_URL"]
    """)
    app = make_app(PLUGINS=[name], ACME_SINK_URL="http://127.0.0.1:1/x")
    assert app.config["ACME_SINK_URL"] == "http://127.0.0.1:1/x"
    with pytest.raises(ConfigError, match="ACME_SINK_URI: unknown configuration key.*did you mean ACME_SINK_URL"):
        make_app(PLUGINS=[name], ACME_SINK_URI="http://127.0.0.1:1/x")
