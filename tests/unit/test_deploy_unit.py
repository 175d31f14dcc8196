"""CONTRACT.md section 8 *rev 3* "The host" and section 11 "One environment": the shipped unit and
README's install steps, read as an operator would run them."""

import re
import shutil
import subprocess

import pytest

from tests.deploy_files import (
    README,
    UNIT_PATH,
    parse_environment_file,
    readme_cli_function,
    readme_env_file,
    readme_lines,
    unit_service,
    unit_value,
)

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
CREDENTIALS = "/run/credentials/dtmf-gateway.service/"


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (.ci/run installs systemd)")
def test_unit_scores_at_most_2_5_on_systemd_analyze_security():
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT_PATH)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 2.5, done.stdout


def test_unit_hardening_named_by_the_contract():
    settings = dict(unit_service())
    assert settings["UMask"] == "0077"
    assert settings["CapabilityBoundingSet"] == ""
    assert "@system-service" in [v for k, v in unit_service() if k == "SystemCallFilter"]
    assert settings["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "PrivateDevices"):
        assert settings[key] == "yes", key
    assert settings["ProtectProc"] == "invisible"
    assert settings["LimitCORE"] == "0"
    assert re.fullmatch(r"\d+[KMG]", settings["MemoryMax"]) and int(settings["TasksMax"]) > 0
    assert settings["LoadCredential"] == "dtmf:/etc/dtmf-gateway/credentials"
    for key in ("RuntimeDirectoryMode", "StateDirectoryMode", "LogsDirectoryMode"):
        assert settings[key] == "0700", key


def test_every_setting_comes_from_the_one_environment_file():
    """The CLI reads the env file only: a setting the unit adds with Environment= would be missed."""
    keys = [k for k, _ in unit_service()]
    assert "Environment" not in keys
    assert keys.count("EnvironmentFile") == 1
    assert not re.search(r"\$\{?DTMF_|--env|-e DTMF_", unit_value("ExecStart"))
    env_file = unit_value("EnvironmentFile")
    function = readme_cli_function()
    assert f". {env_file} " in function and "dtmf-gateway" in function
    # Every README line that runs the CLI as the service goes through that function (or the file).
    for line in readme_lines(r"(sudo|env) .*dtmf-gateway (audit|check-config)|\| xargs"):
        assert env_file in line and "xargs" not in line, line


def test_secrets_reach_the_service_as_credentials_not_environment():
    env = parse_environment_file(readme_env_file())
    secret_keys = [k for k in env if k.endswith(("_SECRET", "_HASH_KEY", "_PASSWORD", "_TOKEN"))]
    assert not secret_keys, f"secrets in the environment file: {secret_keys}"
    files = {k: v for k, v in env.items() if k.endswith("_FILE") and k != "DTMF_API_KEYS_FILE"}
    assert "DTMF_CXONE_CLIENT_SECRET_FILE" in files and "DTMF_IDEMPOTENCY_HASH_KEY_FILE" in files
    text = README.read_text()
    for key, path in files.items():
        assert path.startswith(CREDENTIALS + "dtmf_"), (key, path)
        name = path.removeprefix(CREDENTIALS + "dtmf_")
        assert f"/etc/dtmf-gateway/credentials/{name}" in text, f"README never creates the credential {name}"


def test_readme_install_leaves_code_to_root_and_the_env_file_0640_root_dtmf():
    env_file = unit_value("EnvironmentFile")
    text = README.read_text()
    assert f"chown root:dtmf {env_file}" in text and f"chmod 0640 {env_file}" in text
    assert not re.search(r"chown -R dtmf\S* /opt/dtmf-gateway", text)
    assert "chown -R root:root /opt/dtmf-gateway" in text
    assert not re.search(r"env file[^.\n]*0600|\(mode 0600\)", text)


def test_readme_kill_commands_use_the_pid_file_the_env_file_sets():
    pidfile = parse_environment_file(readme_env_file())["DTMF_PIDFILE"]
    assert pidfile.startswith("/run/dtmf-gateway/")
    for signal_name in ("HUP", "TERM"):
        lines = [x for x in readme_lines(rf"kill -{signal_name} ") if "$(cat" in x]
        assert any(f'"$(cat {pidfile})"' in line for line in lines), lines
        for line in lines:  # elsewhere README names the setting itself
            assert pidfile in line or "$DTMF_PIDFILE" in line, line
    assert not readme_lines(r"kill -(HUP|TERM) <")
