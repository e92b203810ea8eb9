"""`eprl serve --config serve.yaml`: every setting from one file, flags over it, errors naming keys."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from serving_server import REPO, free_port

from serving.config import ServeConfigError, load_serve_settings, parse_sets
from serving.settings import TOKEN_ENV_VAR, ServeSettings

SHIPPED = REPO / "configs" / "serve.yaml"
TOKEN = "a-token-of-24-characters"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def test_the_shipped_config_lists_every_setting_at_its_default():
    tree = yaml.safe_load(SHIPPED.read_text())
    assert set(tree) == set(ServeSettings.model_fields) - {"token"}  # token: commented out
    assert load_serve_settings(SHIPPED, environ={}) == ServeSettings()


def test_every_setting_comes_from_the_file(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"trainer-a {TOKEN}\n")
    path = write(
        tmp_path,
        f"""
host: 0.0.0.0
port: 9100
tokens_file: {tokens}
max_sessions: 7
env_ids: [eprl/CodeExec-v0]
pinned_env_kwargs:
  eprl/CodeExec-v0: {{sandbox: {{memory_mb: 256}}}}
call_timeout_s: 30
reset_timeout_s: 90
idle_timeout_s: 45
max_body_bytes: 65536
max_action_chars: 1000
drain_grace_s: 12
start_method: spawn
log_level: warning
access_log: false
""",
    )
    settings = load_serve_settings(path, environ={})
    assert (settings.host, settings.port, settings.max_sessions) == ("0.0.0.0", 9100, 7)
    assert settings.tokens_file == tokens and settings.authenticated and settings.token is None
    assert settings.env_ids == ("eprl/CodeExec-v0",)
    assert settings.pinned_kwargs("eprl/CodeExec-v0") == {"sandbox": {"memory_mb": 256}}
    assert (settings.timeout_of("step"), settings.timeout_of("reset")) == (30, 90)
    assert (settings.idle_timeout_s, settings.max_body_bytes, settings.max_action_chars) == (
        45,
        65536,
        1000,
    )
    assert (settings.drain_grace_s, settings.start_method, settings.log_level) == (
        12,
        "spawn",
        "warning",
    )
    assert settings.access_log is False


def test_overrides_win_over_the_file_key_by_key(tmp_path):
    path = write(tmp_path, "port: 9100\nmax_sessions: 7\npinned_env_kwargs: {eprl/X: {a: 1}}\n")
    overrides = {
        "port": 9200,
        "max_sessions": None,  # a flag not given leaves the file's value
        **parse_sets(["idle_timeout_s=5", "pinned_env_kwargs.eprl/X.b=[1, 2]"]),
    }
    settings = load_serve_settings(path, overrides, environ={})
    assert (settings.port, settings.max_sessions, settings.idle_timeout_s) == (9200, 7, 5)
    assert settings.pinned_kwargs("eprl/X") == {"a": 1, "b": [1, 2]}  # merged, not replaced
    # the token: flag, else $EPRL_TOKEN, else the file's
    with_token = write(tmp_path, f"token: {TOKEN}-file\n")
    environ = {TOKEN_ENV_VAR: f"{TOKEN}-env"}
    assert load_serve_settings(with_token, environ=environ).token.get_secret_value() == (
        f"{TOKEN}-env"
    )
    flagged = load_serve_settings(with_token, {"token": f"{TOKEN}-flag"}, environ=environ)
    assert flagged.token.get_secret_value() == f"{TOKEN}-flag"
    assert load_serve_settings(with_token, environ={}).token.get_secret_value() == f"{TOKEN}-file"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_sesions: 3\n", "max_sesions: unknown key (valid: access_log,"),
        ("port: 99999\n", "port: Input should be less than or equal to 65535 (got 99999)"),
        ("idle_timeout_s: soon\n", "idle_timeout_s: Input should be a valid number"),
        ("start_method: fork\n", "start_method: Input should be 'forkserver' or 'spawn'"),
        ("tls_certfile: /no/cert.pem\n", "tls_certfile: no such file: '/no/cert.pem'"),
        ("tokens_file: /no/tokens\n", "tokens_file: no such file: '/no/tokens'"),
        ("host: 0.0.0.0\n", "refusing to serve on '0.0.0.0' without a token"),
        ("token: tooshort\n", "token: the token must be at least 16"),
        ("[1, 2]\n", "must hold a mapping of settings, got list"),
        ("port: [\n", "is not valid YAML"),
    ],
)
def test_errors_name_the_key_and_the_value(tmp_path, text, expected):
    with pytest.raises(ServeConfigError) as error:
        load_serve_settings(write(tmp_path, text), environ={})
    assert expected in str(error.value)
    assert "tooshort" not in str(error.value)  # a token's value is never shown


def test_cert_without_key_and_missing_file_and_bad_set(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ServeConfigError, match="TLS needs both tls_certfile and tls_keyfile"):
        load_serve_settings(None, {"tls_certfile": str(cert)}, environ={})
    with pytest.raises(ServeConfigError, match="serve config file '/no/serve.yaml' does not exist"):
        load_serve_settings("/no/serve.yaml", environ={})
    with pytest.raises(ServeConfigError, match="not of the form key=value"):
        parse_sets(["idle_timeout_s"])


def eprl(*args: str, **kwargs) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV_VAR}
    return subprocess.Popen(
        [sys.executable, str(REPO / "eprl.py"), "serve", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_eprl_serve_exits_2_naming_the_bad_key(tmp_path):
    process = eprl("--config", str(write(tmp_path, "max_sessions: 0\n")))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "eprl: error: invalid serve config" in output
    assert "max_sessions: Input should be greater than or equal to 1 (got 0)" in output


def test_eprl_serve_runs_the_config_with_flags_over_it(tmp_path):
    port = free_port()
    path = write(tmp_path, f"port: {free_port()}\nmax_sessions: 9\nidle_timeout_s: 77\n")
    process = eprl("--config", str(path), "--port", str(port), "--set", "max_sessions=5")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "eprl serve did not start"
                time.sleep(0.2)
        assert health["max_sessions"] == 5  # --set over the file's 9, on the --port flag's port
        created = httpx.post(
            f"http://127.0.0.1:{port}/v1/sessions", json={"env_id": "eprl/CodeExec-v0"}, timeout=60
        ).json()
        assert created["limits"]["idle_timeout_s"] == 77  # the file's value
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
