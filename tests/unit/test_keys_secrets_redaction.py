"""CONTRACT.md section 8, *rev 3*: keys that never fail open, secrets from files and masked, safe PCI
defaults, no plaintext upstreams, trust at the edge (issue 18, the gateway's side)."""

import json
import logging
import os

import pytest

from dtmf_service import config as cfg
from tests.conftest import VALID

GOOD = "good-key-0123456789"
OTHER = "other-key-0123456789"


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def finalised(**values):
    config = dict(values)
    cfg.finalise(config)
    return config


# -- 1. no plaintext to another host -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("CXONE_BASE_URL", "http://cxone.example.com/api/v2"),
        ("CXONE_TOKEN_URL", "http://cxone.example.com/oauth/token"),
        ("AUDIT_WEBHOOK_URL", "http://audit:pw@siem.example.com/hook"),
        ("AUDIT_SYSLOG_ADDRESS", "udp://siem.example.com:514"),
        ("AUDIT_SYSLOG_ADDRESS", "tcp://10.0.0.5:514"),
        ("AUDIT_WEBHOOK_URL", "http://[2001:db8::1]:8080/hook"),
    ],
)
def test_plaintext_to_another_host_stops_start_up_naming_the_key(name, value):
    settings = {"CXONE_BASE_URL": "https://cxone.example.com/api/v2", "CXONE_CLIENT_ID": "i"}
    settings |= {"CXONE_CLIENT_SECRET": "s", "ALLOW_UNAUTHENTICATED": True, name: value}
    with pytest.raises(cfg.ConfigError) as refused:
        finalised(**settings)
    line = str(refused.value)
    assert line.startswith(f"{name}:") and "ALLOW_PLAINTEXT" in line and "\n" not in line
    assert "pw" not in line  # the host is named, never the user-info
    finalised(**settings, ALLOW_PLAINTEXT=True)  # an explicit, documented opt-out


@pytest.mark.parametrize(
    "name, value",
    [
        ("CXONE_BASE_URL", "http://127.0.0.1:9000/api/v2"),
        ("AUDIT_WEBHOOK_URL", "http://localhost:8080/hook"),
        ("AUDIT_WEBHOOK_URL", "http://[::1]:8080/hook"),
        ("AUDIT_SYSLOG_ADDRESS", "udp://127.0.0.2:514"),
        ("AUDIT_SYSLOG_ADDRESS", "/dev/log"),
        ("AUDIT_SYSLOG_ADDRESS", "tls://siem.example.com:6514"),
        ("AUDIT_WEBHOOK_URL", "https://siem.example.com/hook"),
    ],
)
def test_loopback_and_encrypted_addresses_are_allowed(name, value):
    settings = {"CXONE_BASE_URL": "https://cxone.example.com/api/v2", "CXONE_CLIENT_ID": "i"}
    finalised(**{**settings, "CXONE_CLIENT_SECRET": "s", "ALLOW_UNAUTHENTICATED": True, name: value})


def test_check_config_reports_plaintext_too(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from dtmf_service.cli import main

    monkeypatch.setenv("DTMF_AUDIT_WEBHOOK_URL", "http://siem.example.com/hook")  # the suite clears DTMF_* after
    monkeypatch.setenv("DTMF_METRICS_DIR", str(tmp_path / "metrics"))
    result = CliRunner().invoke(main, ["check-config"])
    assert result.exit_code == 4 and "AUDIT_WEBHOOK_URL: http:// to siem.example.com" in result.output


# -- 2. safe PCI defaults ------------------------------------------------------------------------


def test_digits_are_masked_by_default_in_every_event(make_app, tmp_path):
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"))
    client = app.test_client()
    assert client.post("/api/dtmf/parse", json={**VALID, "digits": "7413"}).status_code == 200
    # Rejected digits: redacted by the same rule, never stored as sent.
    bad = {**VALID, "digits": "7413 card 4111111111111111"}
    assert client.post("/api/dtmf/parse", json=bad).status_code == 400
    app.extensions["dtmf"].delivery.flush(5)
    accepted, rejected = (json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines())
    assert accepted["digits"] == "****"
    assert rejected["validation_passed"] is False and rejected["digits"] == "*" * len(bad["digits"])
    # Every field but the random ids (a uuid may hold "7413" by chance) is free of the digits sent.
    random_ids = {"event_id", "request_id", "trace_id", "timestamp"}
    fields = json.dumps([{k: v for k, v in e.items() if k not in random_ids} for e in (accepted, rejected)])
    assert "7413" not in fields and "4111" not in fields


def test_rejected_digits_are_hashed_like_accepted_ones(make_app, tmp_path):
    client = make_app(
        AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "b.jsonl"), AUDIT_DIGITS="hashed", AUDIT_HASH_KEY="k"
    ).test_client()
    client.post("/api/dtmf/parse", json={**VALID, "digits": "12A4"})
    client.application.extensions["dtmf"].delivery.flush(5)
    (event,) = (json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines())
    assert event["digits"].startswith("hmac-sha256:") and "12A4" not in json.dumps(event)


def test_full_digits_outside_sandbox_warn_at_start(make_app, upstream_config, caplog):
    with caplog.at_level(logging.WARNING, logger="dtmf_service"):
        make_app(**upstream_config, AUDIT_DIGITS="full")
    assert any("AUDIT_DIGITS=full" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dtmf_service"):
        make_app(**upstream_config)  # masked, the default: nothing to warn about
    assert not any("AUDIT_DIGITS" in r.getMessage() for r in caplog.records)


# -- 3. secrets from files, masked by check-config -------------------------------------------------


def test_every_secret_and_password_url_can_come_from_a_file(tmp_path):
    for name in ("CXONE_CLIENT_SECRET", "AUDIT_WEBHOOK_SECRET", "AUDIT_HASH_KEY", "IDEMPOTENCY_HASH_KEY"):
        assert name in cfg.SECRET_FILE_KEYS
    for name in ("AUDIT_OUTBOX", "IDEMPOTENCY_STORE", "AUDIT_WEBHOOK_URL"):
        assert name in cfg.SECRET_FILE_KEYS
    secret = tmp_path / "client-secret"
    secret.write_bytes(b"s3cr&t value\n")  # one trailing newline stripped, nothing else
    hook = tmp_path / "hook"
    hook.write_bytes(b"https://audit:pw@siem.example.com/hook\r\n")
    environ = {
        "DTMF_CXONE_BASE_URL": "https://cxone.example.com/api/v2",
        "DTMF_CXONE_CLIENT_ID": "id",
        "DTMF_CXONE_CLIENT_SECRET_FILE": str(secret),
        "DTMF_AUDIT_WEBHOOK_URL_FILE": str(hook),
        "DTMF_ALLOW_UNAUTHENTICATED": "true",
    }
    config: dict = {}
    cfg.load_sources(config, environ)
    cfg.finalise(config)
    cfg.reject_unknown(config)
    assert config["CXONE_CLIENT_SECRET"] == "s3cr&t value"
    assert config["AUDIT_WEBHOOK_URL"] == "https://audit:pw@siem.example.com/hook"


@pytest.mark.parametrize("kind", ["both", "missing", "dev-zero", "empty"])
def test_a_bad_secret_file_stops_start_up_with_one_line(tmp_path, kind):
    path = tmp_path / "secret"
    settings = {"AUDIT_HASH_KEY_FILE": str(path)}
    if kind == "both":
        path.write_text("from-file\n")
        settings["AUDIT_HASH_KEY"] = "inline"
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "empty":
        path.write_text("\n")
    with pytest.raises(cfg.ConfigError, match="^AUDIT_HASH_KEY") as refused:
        finalised(**settings)
    assert "from-file" not in str(refused.value)


def test_check_config_masks_secrets_and_url_passwords(make_app):
    app = make_app(
        AUDIT_OUTBOX="redis://:REDISPASS1@127.0.0.1:6399/0",
        IDEMPOTENCY_STORE="redis://default:REDISPASS2@127.0.0.1:6399/1",
        AUDIT_WEBHOOK_URL="https://audit:WEBHOOKPASS@siem.example.com/hook?token=QSTOKEN&v=2#frag",
        AUDIT_WEBHOOK_SECRET="WHSECRET",
        AUDIT_HASH_KEY="HASHKEY",
        API_KEYS=[GOOD],
    )
    runner = app.test_cli_runner()
    shown = json.loads(runner.invoke(args=["dtmf", "check-config", "--json"]).output)
    text = runner.invoke(args=["dtmf", "check-config"]).output
    for output in (json.dumps(shown), text):
        for secret in ("REDISPASS1", "REDISPASS2", "WEBHOOKPASS", "QSTOKEN", "WHSECRET", "HASHKEY", GOOD, "frag"):
            assert secret not in output
    assert shown["AUDIT_OUTBOX"] == "redis://********@127.0.0.1:6399/0"
    assert shown["AUDIT_WEBHOOK_URL"] == "https://********@siem.example.com/hook?token=********&v=********#********"


def test_mask_url_keeps_every_host_of_a_sentinel_url():
    url = "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    assert cfg.mask_url(url) == "redis+sentinel://********@10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    assert cfg.mask_url("sqlite:///var/lib/dtmf/idem.db") == "sqlite:///var/lib/dtmf/idem.db"


# -- 4. API keys that never fail open --------------------------------------------------------------


@pytest.mark.parametrize("keys, position", [("x", 1), (f"{GOOD},pass word-0123456789", 2), (f"{GOOD},é" * 2, 2)])
def test_a_weak_key_in_api_keys_stops_start_up_naming_its_position(keys, position):
    config: dict = {}
    cfg.load_sources(config, {"DTMF_API_KEYS": keys})
    with pytest.raises(cfg.ConfigError, match=f"^API_KEYS: key {position} is") as refused:
        cfg.finalise(config)
    assert not any(len(key) > 1 and key in str(refused.value) for key in keys.split(","))


def write_keys(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_keys_file_with_bom_and_crlf_and_comment_lines_is_read(tmp_path):
    path = write_keys(
        tmp_path / "k", f"\ufeff# ops, 2026-12\r\n{GOOD}\r\n\r\n   # old: revoked\r\n{OTHER}\r\n".encode()
    )
    assert cfg.read_api_keys_file(path) == [GOOD, OTHER]


@pytest.mark.parametrize(
    "data, message",
    [
        (f"{GOOD}  # the ops team\n".encode(), "line 1 .* more than one word"),
        (f"# a\n{GOOD}\nshort\n".encode(), "line 3 .* shorter than 16"),
        (f"{GOOD},{OTHER}\n".encode(), "line 1 .* comma"),
        (b"\xff\xfe" + GOOD.encode("utf-16-le"), "not UTF-8"),
        ((GOOD + "\n") * 60000, "larger than 1048576 bytes"),
    ],
)
def test_a_bad_keys_file_stops_start_up_naming_the_line_never_the_key(tmp_path, data, message):
    path = write_keys(tmp_path / "k", data if isinstance(data, bytes) else data.encode())
    with pytest.raises(cfg.ConfigError, match=f"^API_KEYS_FILE: .*{message}") as refused:
        finalised(API_KEYS_FILE=path)
    assert GOOD not in str(refused.value) and "short" not in str(refused.value).replace("shorter", "")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "directory", "missing"])
def test_a_keys_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, target):
    path = tmp_path / "k"
    if target == "fifo":
        os.mkfifo(path)  # opening it must not wait for a writer
    elif target == "directory":
        path.mkdir()
    elif target == "/dev/zero":
        path.symlink_to("/dev/zero")  # must not be read without bound
    with pytest.raises(cfg.ConfigError, match="^API_KEYS_FILE: "):
        finalised(API_KEYS_FILE=str(path))


def test_keys_file_means_authentication_even_with_allow_unauthenticated(make_app, upstream_config, tmp_path):
    path = write_keys(tmp_path / "k", f"{GOOD}\n".encode())
    client = make_app(**upstream_config, API_KEYS_FILE=path).test_client()  # ALLOW_UNAUTHENTICATED=true too
    assert client.post("/api/dtmf/parse", json=VALID).status_code == 401
    assert client.post("/api/dtmf/parse", json=VALID, headers=auth(GOOD)).status_code == 200


@pytest.mark.parametrize("content", [b"", b"# every key revoked\n"])
def test_an_empty_keys_file_accepts_nobody_even_in_sandbox_mode(make_app, tmp_path, caplog, content):
    path = write_keys(tmp_path / "k", content)
    with caplog.at_level(logging.ERROR, logger="dtmf_service"):
        client = make_app(API_KEYS_FILE=path).test_client()
    assert any("holds no key" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert client.post("/api/dtmf/parse", json=VALID).status_code == 401
    assert client.post("/api/dtmf/parse", json=VALID, headers=auth(GOOD)).status_code == 401
    assert client.get("/healthz").get_json()["api_keys"] == "ok"


def test_failed_authentications_are_counted_without_a_per_key_label(make_app):
    client = make_app(API_KEYS=[GOOD], METRICS_EXPORTERS=["memory", "prometheus"]).test_client()
    for key in ("wrong-0123456789abcdef", "", GOOD[:-1]):
        assert client.post("/api/dtmf/parse", json=VALID, headers=auth(key)).status_code == 401
    assert client.get("/api/metrics").status_code == 401  # a refused scrape counts too
    body = client.get("/api/metrics", headers=auth(GOOD)).get_json()
    assert body["auth_failures"] == 4 and body["total_submissions"] == 0
    text = client.get("/metrics", headers=auth(GOOD)).get_data(as_text=True)
    (line,) = [line for line in text.splitlines() if line.startswith("dtmf_auth_failures_total")]
    assert line == "dtmf_auth_failures_total 4.0"


# -- 5. trust at the edge --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer, allowed, audited",
    [
        ("127.0.0.1", None, "10.1.2.3"),
        ("::1", None, "10.1.2.3"),
        ("127.0.0.2", None, "127.0.0.2"),
        ("192.0.2.7", None, "192.0.2.7"),
        ("192.0.2.7", "192.0.2.0/24", "10.1.2.3"),
        ("127.0.0.1", "192.0.2.0/24", "127.0.0.1"),
    ],
)
def test_forwarded_for_is_trusted_only_from_forwarded_allow_ips(make_app, tmp_path, peer, allowed, audited):
    settings = {"FORWARDED_ALLOW_IPS": allowed} if allowed else {}
    app = make_app(AUDIT_SINKS=["file"], AUDIT_FILE_PATH=str(tmp_path / "a.jsonl"), PROXY_COUNT=1, **settings)
    app.test_client().post(
        "/api/dtmf/parse",
        json=VALID,
        headers={"X-Forwarded-For": "6.6.6.6, 10.1.2.3"},
        environ_base={"REMOTE_ADDR": peer},
    )
    app.extensions["dtmf"].delivery.flush(5)
    assert json.loads((tmp_path / "a.jsonl").read_text())["client_ip"] == audited


def test_forwarded_allow_ips_must_be_addresses():
    with pytest.raises(cfg.ConfigError, match="^FORWARDED_ALLOW_IPS: 'nginx'"):
        finalised(FORWARDED_ALLOW_IPS="127.0.0.1,nginx")


@pytest.mark.parametrize(
    "supplied, kept",
    [
        ("abc-123_x.y:z", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("a b", False),
        ("rid\\", False),
        ('x"y', False),
        ("id/../x", False),
        ("", False),
    ],
)
def test_request_id_is_kept_only_when_it_matches_the_shared_rule(client, supplied, kept):
    echoed = client.get("/healthz", headers={"X-Request-ID": supplied}).headers["X-Request-ID"]
    assert (echoed == supplied) is kept
    assert len(echoed) <= 128 and all(c.isalnum() or c in "._:-" for c in echoed)
