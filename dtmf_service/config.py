"""Configuration: defaults, the DTMF_* environment, an optional file, and checks.

Every key has a type; a bad value stops start-up with one line naming the key
(and never echoing a secret's value).

Longer than the project's usual module because it is the one table of every key in
CONTRACT.md section 6, with the checks that span keys (sandbox mode, the longest request
time) beside it: an operator looking up a key reads one file.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dtmf_service.simulator import SANDBOX_URL
from dtmf_service.web import apikeys

ENV_PREFIX = "DTMF"


class ConfigError(ValueError):
    """A configuration value that the service cannot start with."""


@dataclass(frozen=True)
class Key:
    default: Any
    kind: str  # str | secret | url (may carry a password) | int | float | bool | list | secret_list | choice
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


KEYS: dict[str, Key] = {
    # Upstream (CONTRACT.md sections 3 and 6)
    "CXONE_API": Key("tutorial", "choice", choices=("tutorial", "agent")),
    "CXONE_INSTANCE": Key(None, "str"),
    "CXONE_BASE_URL": Key(None, "url"),
    "CXONE_TOKEN_URL": Key(None, "url"),
    "CXONE_CLIENT_ID": Key(None, "secret"),
    "CXONE_CLIENT_SECRET": Key(None, "secret"),
    "CXONE_SCOPE": Key("interaction:write", "str"),
    "CXONE_MAX_ATTEMPTS": Key(3, "int", minimum=1, maximum=20),
    "CXONE_RETRY_BUDGET_S": Key(10.0, "float", minimum=0.001, maximum=600),
    "CXONE_BACKOFF_BASE_S": Key(1.0, "float", minimum=0, maximum=600),
    "CXONE_BACKOFF_MAX_S": Key(8.0, "float", minimum=0, maximum=600),
    "CXONE_CONNECT_TIMEOUT_S": Key(3.0, "float", minimum=0.001, maximum=600),
    "CXONE_READ_TIMEOUT_S": Key(15.0, "float", minimum=0.001, maximum=600),
    "CXONE_TOKEN_REFRESH_MARGIN_S": Key(None, "float", minimum=0, maximum=86400),
    "CXONE_CA_BUNDLE": Key(None, "str"),
    # Agent API dialect (../shared/CXONE-AGENT-API.md)
    "CXONE_AUTH_BASE": Key("https://cxone.niceincontact.com", "url"),
    "CXONE_API_ENDPOINT": Key(None, "url"),
    "CXONE_TENANT_ID": Key(None, "str"),
    "CXONE_ACCESS_KEY_ID": Key(None, "secret"),
    "CXONE_ACCESS_KEY_SECRET": Key(None, "secret"),
    "CXONE_AGENT_API_VERSION": Key("23.0", "str"),
    "CXONE_TONE_DURATION_MS": Key(340, "int", minimum=1, maximum=10000),
    "CXONE_TONE_SPACING_MS": Key(0, "int", minimum=0, maximum=10000),
    # HTTP edge
    "MAX_CONTENT_LENGTH": Key(64 * 1024, "int", minimum=1024, maximum=1024 * 1024),
    "API_KEYS": Key([], "secret_list"),
    "API_KEYS_FILE": Key(None, "str"),
    "METRICS_PUBLIC": Key(False, "bool"),
    "ALLOW_UNAUTHENTICATED": Key(False, "bool"),
    "PROXY_COUNT": Key(0, "int", minimum=0, maximum=10),
    "FORWARDED_ALLOW_IPS": Key(["127.0.0.1", "::1"], "list"),
    "ALLOW_PLAINTEXT": Key(False, "bool"),
    "IDEMPOTENCY_STORE": Key(None, "url"),
    "IDEMPOTENCY_TTL_S": Key(86400, "int", minimum=1, maximum=30 * 86400),
    "IDEMPOTENCY_HASH_KEY": Key(None, "secret"),
    # Plugins
    "METRICS_EXPORTERS": Key(["memory"], "list"),
    "AUDIT_SINKS": Key([], "list"),
    "PLUGINS": Key([], "list"),
    "METRICS_DIR": Key(None, "str"),
    # Audit
    "AUDIT_DIGITS": Key("masked", "choice", choices=("full", "masked", "hashed")),
    "AUDIT_HASH_KEY": Key(None, "secret"),
    "AUDIT_SENSITIVE_KEYS": Key([], "list"),
    "AUDIT_SPOOL_DIR": Key(None, "str"),
    "AUDIT_SPOOL_MAX_MB": Key(512.0, "float", minimum=0.001, maximum=1024 * 1024),
    "AUDIT_QUEUE_SIZE": Key(None, "int", minimum=1, maximum=10_000_000),  # deprecated: the outbox has no queue
    "AUDIT_OUTBOX": Key(None, "url"),
    "AUDIT_OUTBOX_FSYNC": Key(False, "bool"),
    "AUDIT_LEASE_S": Key(30.0, "float", minimum=0.1, maximum=3600),
    "AUDIT_BATCH_SIZE": Key(100, "int", minimum=1, maximum=10000),
    "AUDIT_BATCH_WAIT_S": Key(0.05, "float", minimum=0, maximum=10),
    "AUDIT_RETRY_ATTEMPTS": Key(3, "int", minimum=1, maximum=100),
    "AUDIT_BACKOFF_BASE_S": Key(0.5, "float", minimum=0, maximum=600),
    "AUDIT_BACKOFF_MAX_S": Key(30.0, "float", minimum=0, maximum=3600),
    "AUDIT_WEBHOOK_URL": Key(None, "url"),
    "AUDIT_WEBHOOK_SECRET": Key([], "secret_list"),  # several while rotating: the first is current
    "AUDIT_WEBHOOK_CA_BUNDLE": Key(None, "str"),
    "AUDIT_WEBHOOK_TIMEOUT_S": Key(5.0, "float", minimum=0.001, maximum=600),
    "AUDIT_WEBHOOK_CONCURRENCY": Key(8, "int", minimum=1, maximum=64),
    "AUDIT_WEBHOOK_BATCH_MAX": Key(1, "int", minimum=1, maximum=1000),
    "AUDIT_FILE_PATH": Key(None, "str"),
    "AUDIT_FILE_FSYNC": Key("batch", "choice", choices=("always", "batch", "never")),
    "AUDIT_FILE_MODE": Key("0600", "str"),
    "AUDIT_SYSLOG_ADDRESS": Key("/dev/log", "url"),
    "AUDIT_SYSLOG_FACILITY": Key("local0", "str"),
    "AUDIT_SYSLOG_APP_NAME": Key("dtmf-gateway", "str"),
    "AUDIT_SYSLOG_CA_BUNDLE": Key(None, "str"),
    "STATSD_HOST": Key("127.0.0.1", "str"),
    "STATSD_PORT": Key(8125, "int", minimum=1, maximum=65535),
    "STATSD_PREFIX": Key("dtmf", "str"),
    "LOG_LEVEL": Key("INFO", "choice", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
}

# Every secret, and every URL that may carry a password, can be given as K_FILE: a path read at
# start (systemd's LoadCredential=), so the secret stays out of the process environment. API_KEYS
# has API_KEYS_FILE already, with its own meaning (one key per line, reloaded on SIGHUP).
FILE_SUFFIX = "_FILE"
SECRET_FILE_KEYS = tuple(
    name for name, key in KEYS.items() if key.kind in {"secret", "secret_list", "url"} and name != "API_KEYS"
)
KEYS.update({name + FILE_SUFFIX: Key(None, "str") for name in SECRET_FILE_KEYS})
MAX_SECRET_FILE_BYTES = 64 * 1024

_STRING_KINDS = {"str", "secret", "url", "choice", "list", "secret_list"}

# DTMF_* variables that gunicorn.conf.py reads (deployment, not the application): known keys too.
DEPLOYMENT_KEYS = frozenset(
    {
        "BIND",
        "WORKERS",
        "THREADS",
        "ACCESS_LOG",
        "GUNICORN_LOG_LEVEL",
        "CONTROL_SOCKET",
        "REQUEST_READ_TIMEOUT_S",
        "PIDFILE",
        "SERVER",  # dtmf-gateway serve: gunicorn or granian
        "LIFECYCLE",  # set by the master for its workers (wiring/lifecycle.py)
        "DELIVERY",
    }
)


def request_deadline_s(config: Mapping[str, Any]) -> float:
    """The longest a request can last from its first attempt (CONTRACT.md section 3): the retry
    budget plus one read timeout. The one place this figure is computed."""
    return float(config["CXONE_RETRY_BUDGET_S"]) + float(config["CXONE_READ_TIMEOUT_S"])


LEASE_MARGIN_S = 30.0


def request_lease_s(config: Mapping[str, Any]) -> float:
    """How long a mark left by a running request is trusted (the idempotency in-flight mark, the
    audit placeholder): past the longest request with room to spare; after it, its worker is dead."""
    return request_deadline_s(config) + LEASE_MARGIN_S


def reject_unknown(config: Mapping[str, Any], plugin_keys: Iterable[str] = ()) -> None:
    """Stop start-up on a key that names nothing (CONTRACT.md section 8, *rev 2*): a typo such as
    DTMF_AUDIT_DIGIT must never leave redaction, authentication or signing silently off."""
    from flask import Flask

    known = set(KEYS) | DEPLOYMENT_KEYS | set(plugin_keys) | set(Flask.default_config) | {"SANDBOX"}
    for name in sorted(config):
        if name in known or not isinstance(name, str) or not name.isupper():
            continue
        nearest = difflib.get_close_matches(name, sorted(known - set(Flask.default_config)), n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        raise ConfigError(
            f"{name}: unknown configuration key (DTMF_{name} in the environment){hint}"
            " (a plugin's own keys must be declared by its dtmf_config_keys hook)"
        )


def read_api_keys_file(path: str) -> list[str]:
    """The keys of an API_KEYS_FILE (rules in dtmf_service.web.apikeys), or ConfigError naming the line."""
    try:
        return list(apikeys.read_keys_file(path).keys)
    except apikeys.KeysError as exc:
        raise ConfigError(f"API_KEYS_FILE: {exc}") from None


def read_secret_files(config: dict[str, Any]) -> None:
    """Set each secret K given as K_FILE from its file: one trailing newline stripped, K itself unset."""
    for name in SECRET_FILE_KEYS:
        path = config.get(name + FILE_SUFFIX)
        if not path:
            continue
        if config.get(name) not in (None, ""):
            raise ConfigError(f"{name}{FILE_SUFFIX}: set {name} or {name}{FILE_SUFFIX}, not both")
        config[name] = _read_secret_file(name + FILE_SUFFIX, str(path))


def _read_secret_file(name: str, path: str) -> str:
    try:
        data = apikeys.read_regular_file(path, MAX_SECRET_FILE_BYTES)
    except apikeys.FileRefused as exc:
        raise ConfigError(f"{name}: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8") from None
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise ConfigError(f"{name}: {path} is empty")
    return text


_MASK = "********"


def shown_value(name: str, value: Any, kind: str | None = None) -> Any:
    """A key's value as check-config prints it: secrets masked, and the user-info and query of a
    URL (``redis://:pw@host``, ``https://user:pw@host/?token=``). ``kind``: a plugin-declared key's."""
    kind = kind or (KEYS[name].kind if name in KEYS else None)
    if kind is None or not value:
        return value
    if kind == "secret_list":
        return [_MASK] * len(value) if isinstance(value, list) else _MASK
    if kind == "secret":
        return _MASK
    if kind == "url":
        return mask_url(str(value))
    return value


def mask_url(url: str) -> str:
    """``url`` with its user-info, query and fragment masked; the scheme, hosts and path kept."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url if "@" not in url and "?" not in url else _MASK
    rest, hash_sign, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = f"{_MASK}@{netloc.rpartition('@')[2]}"
    shown = f"{scheme}://{netloc}{slash}{path}"
    if question:
        pairs = [pair.partition("=") for pair in query.split("&")]
        shown += "?" + "&".join(f"{k}={_MASK}" if eq else _MASK for k, eq, _ in pairs)
    if hash_sign:
        shown += "#" + _MASK
    return shown


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "on"}:
        return True
    if text in {"false", "0", "no", "off", ""}:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _as_number(name: str, key: Key, value: Any, cast: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    try:
        number = cast(value)
        if cast is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {'an integer' if cast is int else 'a number'}, got {value!r}") from None
    if (
        number != number
        or (key.minimum is not None and number < key.minimum)
        or (key.maximum is not None and number > key.maximum)
    ):
        raise ConfigError(f"{name}: must be between {key.minimum:g} and {key.maximum:g}, got {value!r}")
    return number


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def normalise(name: str, key: Key, value: Any) -> Any:
    """Return ``value`` converted to the key's type, or raise ConfigError."""
    if value is None or (value == "" and key.kind not in {"list", "secret_list"}):
        # Unset, or set to nothing (a number or flag left empty): the default. An empty list is [].
        return list(key.default) if isinstance(key.default, list) else key.default
    kind = key.kind
    if kind == "bool":
        return _as_bool(name, value)
    if kind == "int":
        return _as_number(name, key, value, int)
    if kind == "float":
        return _as_number(name, key, value, float)
    if kind in {"list", "secret_list"}:
        return _as_list(value)
    if kind == "choice":
        text = str(value).strip()
        lowered = {c.lower(): c for c in key.choices}
        if text.lower() not in lowered:
            raise ConfigError(f"{name}: must be one of {', '.join(key.choices)}, got {text!r}")
        return lowered[text.lower()]
    if not isinstance(value, str):
        if kind == "secret":
            raise ConfigError(f"{name}: must be a string")
        value = str(value)
    return value


def load_sources(config: dict[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Fill ``config`` from DTMF_CONFIG_FILE, then the DTMF_* environment."""
    environ = os.environ if environ is None else environ
    path = environ.get(f"{ENV_PREFIX}_CONFIG_FILE")
    if path:
        config.update(_read_file(path))
    for env_name, raw in environ.items():
        if not env_name.startswith(f"{ENV_PREFIX}_") or env_name == f"{ENV_PREFIX}_CONFIG_FILE":
            continue
        name = env_name[len(ENV_PREFIX) + 1 :]
        key = KEYS.get(name)
        if key is not None and key.kind in _STRING_KINDS:
            # Secrets and strings stay exactly as typed: "00123" or "1e5" are not numbers.
            config[name] = raw
            continue
        try:
            config[name] = json.loads(raw)
        except ValueError:
            config[name] = raw


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(f"DTMF_CONFIG_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            loaded = json.loads(data)
        elif path.endswith(".toml"):
            import tomllib

            loaded = tomllib.loads(data.decode("utf-8"))
        else:
            namespace: dict[str, Any] = {}
            exec(compile(data, path, "exec"), namespace)  # noqa: S102 - operator-owned file, like Flask's from_pyfile
            loaded = {k: v for k, v in namespace.items() if k.isupper()}
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"DTMF_CONFIG_FILE: cannot parse {path}: {type(exc).__name__}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"DTMF_CONFIG_FILE: {path} must hold a mapping of keys")
    return loaded


def finalise(config: dict[str, Any]) -> None:
    """Apply defaults, convert types, derive URLs and check combinations, in place."""
    read_secret_files(config)
    for name, key in KEYS.items():
        config[name] = normalise(name, key, config.get(name))
    config.pop("SANDBOX", None)  # derived below, never taken from the environment or a file
    config["SANDBOX"] = is_sandbox(config)
    _load_api_keys(config)
    _derive_urls(config)
    _check_combinations(config)
    _refuse_plaintext(config)
    _check_forwarded_allow_ips(config["FORWARDED_ALLOW_IPS"])


def _load_api_keys(config: dict[str, Any]) -> None:
    """API_KEYS checked key by key, then API_KEYS_FILE's keys added (a gunicorn master's copy when
    it read the file: a bad file at a reload never reaches a worker)."""
    try:
        keys = apikeys.check_keys(config["API_KEYS"], "API_KEYS")
        if config["API_KEYS_FILE"]:
            keys += apikeys.current(config["API_KEYS_FILE"]).keys
    except apikeys.KeysError as exc:
        name = "API_KEYS" if str(exc).startswith("API_KEYS:") else "API_KEYS_FILE"
        raise ConfigError(str(exc) if name == "API_KEYS" else f"API_KEYS_FILE: {exc}") from None
    config["API_KEYS"] = keys


_PLAINTEXT_URL_KEYS = (
    "CXONE_BASE_URL",
    "CXONE_TOKEN_URL",
    "CXONE_AUTH_BASE",
    "CXONE_API_ENDPOINT",
    "AUDIT_WEBHOOK_URL",
)


def _refuse_plaintext(config: Mapping[str, Any]) -> None:
    """Digits, the CXone secret and audit events never travel in clear past this host
    (CONTRACT.md section 8, *rev 3*), unless ALLOW_PLAINTEXT says so."""
    if config["ALLOW_PLAINTEXT"]:
        return
    plain = [(name, "http") for name in _PLAINTEXT_URL_KEYS] + [
        ("AUDIT_SYSLOG_ADDRESS", "udp"),
        ("AUDIT_SYSLOG_ADDRESS", "tcp"),
    ]
    for name, scheme in plain:
        value = str(config.get(name) or "")
        if config["SANDBOX"] and name.startswith("CXONE_"):
            continue  # the in-process simulator: nothing leaves the process
        if not value.lower().startswith(f"{scheme}://"):
            continue
        host = _url_host(value)
        if not is_loopback_host(host):
            raise ConfigError(
                f"{name}: {scheme}:// to {host or 'an unnamed host'} is plaintext off this host (digits and secrets"
                f" in clear); use {'https' if scheme == 'http' else 'tls'}:// or set DTMF_ALLOW_PLAINTEXT=true"
            )


def _url_host(url: str) -> str:
    netloc = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if ":" in netloc else netloc


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: traffic that never leaves the host."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_forwarded_allow_ips(entries: Iterable[str]) -> None:
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"FORWARDED_ALLOW_IPS: {entry!r} is not an address or a network") from None


def is_sandbox(config: Mapping[str, Any]) -> bool:
    """Sandbox mode: tutorial dialect with no CXone instance or base URL configured."""
    if "SANDBOX" in config:
        return bool(config["SANDBOX"])
    return (
        config.get("CXONE_API", "tutorial") == "tutorial"
        and not config.get("CXONE_INSTANCE")
        and not config.get("CXONE_BASE_URL")
    )


def _derive_urls(config: dict[str, Any]) -> None:
    if config["CXONE_API"] != "tutorial":
        return
    instance = config["CXONE_INSTANCE"]
    if instance and ("/" in instance or " " in instance):
        raise ConfigError(f"CXONE_INSTANCE: expected a host name such as acme.my.cxone.com, got {instance!r}")
    if is_sandbox(config):
        config["CXONE_BASE_URL"] = f"{SANDBOX_URL}/api/v2"
    elif not config["CXONE_BASE_URL"]:
        config["CXONE_BASE_URL"] = f"https://{instance}/api/v2"
    config["CXONE_BASE_URL"] = config["CXONE_BASE_URL"].rstrip("/")
    if not config["CXONE_TOKEN_URL"]:
        config["CXONE_TOKEN_URL"] = f"{config['CXONE_BASE_URL']}/oauth/token"
    for name in ("CXONE_BASE_URL", "CXONE_TOKEN_URL"):
        if not config[name].startswith(("http://", "https://")):
            raise ConfigError(f"{name}: must be an http:// or https:// URL")


def _check_combinations(config: dict[str, Any]) -> None:
    sandbox = is_sandbox(config)
    if config["CXONE_API"] == "tutorial" and not sandbox:
        missing = [k for k in ("CXONE_CLIENT_ID", "CXONE_CLIENT_SECRET") if not config[k]]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required when CXONE_INSTANCE or CXONE_BASE_URL is set")
    if config["CXONE_API"] == "agent":
        from dtmf_service.cxone.dialects.agent import check_config

        check_config(config)
    if config["CXONE_TOKEN_REFRESH_MARGIN_S"] is None:
        config["CXONE_TOKEN_REFRESH_MARGIN_S"] = 600.0 if config["CXONE_API"] == "agent" else 30.0
    if not sandbox and not config["API_KEYS"] and not config["API_KEYS_FILE"] and not config["ALLOW_UNAUTHENTICATED"]:
        raise ConfigError(
            "API_KEYS: required outside sandbox mode (anyone reaching the port could press keys in any call);"
            " set DTMF_ALLOW_UNAUTHENTICATED=true to run without caller authentication"
        )
    if config["AUDIT_DIGITS"] == "hashed" and not config["AUDIT_HASH_KEY"]:
        raise ConfigError("AUDIT_HASH_KEY: required when AUDIT_DIGITS=hashed")
    if config["CXONE_BACKOFF_MAX_S"] < config["CXONE_BACKOFF_BASE_S"]:
        raise ConfigError("CXONE_BACKOFF_MAX_S: must be at least CXONE_BACKOFF_BASE_S")
    if not config["AUDIT_SPOOL_DIR"]:
        # Durable by default: a spool under /tmp may be wiped at boot, taking undelivered events with it.
        config["AUDIT_SPOOL_DIR"] = os.path.abspath(os.path.join("var", "audit-spool"))
