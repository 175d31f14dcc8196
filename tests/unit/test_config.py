"""CONTRACT.md section 6: keys from DTMF_* and a file, types kept, bad values stop start-up in one line."""

import os
import subprocess
import sys

import pytest

from dtmf_service import config as cfg
from dtmf_service import create_app
from tests.helpers import ROOT


def loaded(environ):
    config = {}
    cfg.load_sources(config, environ)
    cfg.finalise(config)
    return config


def test_defaults():
    config = loaded({})
    assert config["CXONE_MAX_ATTEMPTS"] == 3
    assert config["CXONE_RETRY_BUDGET_S"] == 10
    assert (config["CXONE_BACKOFF_BASE_S"], config["CXONE_BACKOFF_MAX_S"]) == (1.0, 8.0)
    assert (config["CXONE_CONNECT_TIMEOUT_S"], config["CXONE_READ_TIMEOUT_S"]) == (3, 15)
    assert config["METRICS_EXPORTERS"] == ["memory"]
    assert config["AUDIT_SINKS"] == []
    assert config["CXONE_SCOPE"] == "interaction:write"
    assert config["MAX_CONTENT_LENGTH"] == 65536
    assert cfg.is_sandbox(config)


def test_prefixed_environment_sets_keys():
    config = loaded(
        {
            "DTMF_CXONE_BASE_URL": "http://127.0.0.1:9/api/v2",
            "DTMF_CXONE_CLIENT_ID": "id",
            "DTMF_CXONE_CLIENT_SECRET": "s",
            "DTMF_CXONE_MAX_ATTEMPTS": "5",
            "DTMF_AUDIT_SINKS": "file, webhook",
            "DTMF_ALLOW_UNAUTHENTICATED": "true",
        }
    )
    assert config["CXONE_MAX_ATTEMPTS"] == 5
    assert config["AUDIT_SINKS"] == ["file", "webhook"]
    assert config["CXONE_TOKEN_URL"] == "http://127.0.0.1:9/api/v2/oauth/token"
    assert not cfg.is_sandbox(config)


@pytest.mark.parametrize("secret", ["12345", "00123", "1e5", "true", "null", "[1]"])
def test_secrets_stay_strings_even_when_they_look_like_numbers(secret):
    config = loaded(
        {
            "DTMF_CXONE_INSTANCE": "acme.my.cxone.com",
            "DTMF_CXONE_CLIENT_ID": secret,
            "DTMF_CXONE_CLIENT_SECRET": secret,
            "DTMF_API_KEYS": secret.ljust(16, "0"),  # API keys: at least 16 characters
        }
    )
    assert config["CXONE_CLIENT_SECRET"] == secret
    assert config["CXONE_CLIENT_ID"] == secret
    assert config["API_KEYS"] == [secret.ljust(16, "0")]


def test_instance_derives_urls():
    config = loaded(
        {
            "DTMF_CXONE_INSTANCE": "acme.my.cxone.com",
            "DTMF_CXONE_CLIENT_ID": "i",
            "DTMF_CXONE_CLIENT_SECRET": "s",
            "DTMF_API_KEYS": "k" * 16,
        }
    )
    assert config["CXONE_BASE_URL"] == "https://acme.my.cxone.com/api/v2"
    assert config["CXONE_TOKEN_URL"] == "https://acme.my.cxone.com/api/v2/oauth/token"


def test_config_file_is_read(tmp_path):
    path = tmp_path / "gateway.json"
    path.write_text('{"CXONE_MAX_ATTEMPTS": 2, "AUDIT_DIGITS": "masked"}')
    config = loaded({"DTMF_CONFIG_FILE": str(path), "DTMF_CXONE_MAX_ATTEMPTS": "4"})
    assert config["CXONE_MAX_ATTEMPTS"] == 4  # the environment wins over the file
    assert config["AUDIT_DIGITS"] == "masked"


@pytest.mark.parametrize(
    "environ, key",
    [
        ({"DTMF_CXONE_MAX_ATTEMPTS": "many"}, "CXONE_MAX_ATTEMPTS"),
        ({"DTMF_CXONE_MAX_ATTEMPTS": "0"}, "CXONE_MAX_ATTEMPTS"),
        ({"DTMF_CXONE_RETRY_BUDGET_S": "-1"}, "CXONE_RETRY_BUDGET_S"),
        ({"DTMF_METRICS_PUBLIC": "maybe"}, "METRICS_PUBLIC"),
        ({"DTMF_AUDIT_DIGITS": "partly"}, "AUDIT_DIGITS"),
        ({"DTMF_CXONE_API": "soap"}, "CXONE_API"),
        ({"DTMF_CXONE_INSTANCE": "acme.my.cxone.com"}, "CXONE_CLIENT_ID"),
        ({"DTMF_CXONE_INSTANCE": "acme", "DTMF_CXONE_CLIENT_ID": "i", "DTMF_CXONE_CLIENT_SECRET": "s"}, "API_KEYS"),
        ({"DTMF_AUDIT_DIGITS": "hashed"}, "AUDIT_HASH_KEY"),
        (
            {
                "DTMF_CXONE_BASE_URL": "ftp://x",
                "DTMF_CXONE_CLIENT_ID": "i",
                "DTMF_CXONE_CLIENT_SECRET": "s",
                "DTMF_ALLOW_UNAUTHENTICATED": "true",
            },
            "CXONE_BASE_URL",
        ),
    ],
)
def test_bad_values_name_the_key(environ, key):
    with pytest.raises(cfg.ConfigError) as info:
        loaded(environ)
    assert key in str(info.value)
    assert "\n" not in str(info.value)


def test_secret_values_are_never_echoed_in_errors():
    with pytest.raises(cfg.ConfigError) as info:
        loaded({"DTMF_CXONE_INSTANCE": "acme", "DTMF_CXONE_CLIENT_SECRET": "hunter2"})
    assert "hunter2" not in str(info.value)


def test_outside_sandbox_unauthenticated_needs_explicit_opt_in():
    config = loaded(
        {
            "DTMF_CXONE_INSTANCE": "acme",
            "DTMF_CXONE_CLIENT_ID": "i",
            "DTMF_CXONE_CLIENT_SECRET": "s",
            "DTMF_ALLOW_UNAUTHENTICATED": "true",
        }
    )
    assert config["API_KEYS"] == []


def test_unknown_sink_name_stops_start_up(base_config):
    with pytest.raises(cfg.ConfigError, match="AUDIT_SINKS: no plugin provides 'kafka'"):
        create_app({**base_config, "AUDIT_SINKS": ["kafka"]})


def test_unknown_exporter_name_stops_start_up(base_config):
    with pytest.raises(cfg.ConfigError, match="METRICS_EXPORTERS: no plugin provides 'graphite'"):
        create_app({**base_config, "METRICS_EXPORTERS": ["graphite"]})


def test_app_import_prints_one_line_and_exits_4_on_bad_config():
    env = {"PATH": "/usr/bin:/bin", "DTMF_CXONE_MAX_ATTEMPTS": "lots", "DTMF_LIFECYCLE": "1"}
    proc = subprocess.run([sys.executable, "-c", "import app"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 4
    lines = proc.stderr.strip().splitlines()
    assert lines == ["dtmf-gateway: configuration error: CXONE_MAX_ATTEMPTS: expected an integer, got 'lots'"]


def test_empty_values_mean_unset_and_empty_lists_mean_none():
    config = loaded({"DTMF_CXONE_MAX_ATTEMPTS": "", "DTMF_METRICS_EXPORTERS": "", "DTMF_CXONE_INSTANCE": ""})
    assert config["CXONE_MAX_ATTEMPTS"] == 3
    assert config["METRICS_EXPORTERS"] == []
    assert cfg.is_sandbox(config)


def test_a_misspelt_key_stops_start_up_naming_the_nearest(tmp_path):
    env = {**os.environ, "DTMF_AUDIT_DIGIT": "masked", "DTMF_METRICS_DIR": str(tmp_path), "DTMF_LIFECYCLE": "1"}
    kept = ("DTMF_AUDIT_DIGIT", "DTMF_METRICS_DIR", "DTMF_LIFECYCLE")
    env = {k: v for k, v in env.items() if not k.startswith("DTMF_") or k in kept}
    out = subprocess.run([sys.executable, "-c", "import app"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 4
    (line,) = out.stderr.strip().splitlines()
    assert "AUDIT_DIGIT: unknown configuration key" in line and "did you mean AUDIT_DIGITS?" in line


def test_keys_that_gunicorn_conf_reads_are_known(make_app):
    make_app(BIND="127.0.0.1:1", WORKERS="2", THREADS="4", ACCESS_LOG="off")


def test_unknown_key_in_a_config_file_stops_start_up(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"API_KEY": "k"}')
    config = {}
    cfg.load_sources(config, {"DTMF_CONFIG_FILE": str(path)})
    cfg.finalise(config)
    with pytest.raises(cfg.ConfigError, match="did you mean API_KEYS"):
        cfg.reject_unknown(config)


def test_api_keys_file_is_read_with_comments_and_merged(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# operators\nkey-one-0123456789\n\n  key-two-0123456789  \n")
    config = {"API_KEYS": "inline-0123456789", "API_KEYS_FILE": str(path)}
    cfg.finalise(config)
    assert config["API_KEYS"] == ["inline-0123456789", "key-one-0123456789", "key-two-0123456789"]
    with pytest.raises(cfg.ConfigError, match="API_KEYS_FILE: cannot read"):
        cfg.finalise({"API_KEYS_FILE": str(tmp_path / "missing")})


def test_sandbox_cannot_be_forced_from_the_environment():
    config = {
        "SANDBOX": True,
        "CXONE_INSTANCE": "acme",
        "CXONE_CLIENT_ID": "i",
        "CXONE_CLIENT_SECRET": "s",
        "ALLOW_UNAUTHENTICATED": True,
    }
    cfg.finalise(config)
    assert config["SANDBOX"] is False
    assert config["CXONE_BASE_URL"] == "https://acme/api/v2"
