"""Auth: a token is required off loopback, checked on every route but /healthz, never logged."""

import os
import secrets
import subprocess

import gymnasium
import httpx
import pytest
from serving_server import REPO, free_port, running_service, serve_command

import envs  # noqa: F401  (registers the ids)
from serving.app import ServeSettings, create_app, is_loopback, serve
from serving.client import RemoteEnvError
from serving.settings import TOKEN_ENV_VAR

TOKEN = secrets.token_urlsafe(24)
WRONG = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    # debug logging with the access log on: the most a server prints about requests
    with running_service(
        tmp_path_factory.mktemp("service"), token=TOKEN, log_level="debug"
    ) as running:
        yield running


def test_refuses_to_start_off_loopback_without_a_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV_VAR, raising=False)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        with pytest.raises(ValueError, match="requires a bearer token"):
            serve(host=host, port=free_port())
    with pytest.raises(ValueError, match="at least 16"):
        serve(host="0.0.0.0", port=free_port(), token="short")
    with pytest.raises(ValueError, match="trace"):
        serve(host="127.0.0.1", port=free_port(), token=TOKEN, log_level="trace")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    ServeSettings(host="127.0.0.1")  # loopback without a token is allowed
    assert "**" in repr(ServeSettings(host="0.0.0.0", token=TOKEN))  # never printed
    assert TOKEN not in repr(ServeSettings(host="0.0.0.0", token=TOKEN))


def test_the_cli_path_exits_with_the_error(tmp_path):
    """serve() in a fresh process: it binds nothing and says why (what `eprl serve` prints)."""
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV_VAR}
    result = subprocess.run(
        serve_command({"host": "0.0.0.0", "port": free_port()}),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refusing to serve on '0.0.0.0' without a token" in result.stderr


def test_token_from_environment_off_loopback(tmp_path):
    with running_service(tmp_path, environ={TOKEN_ENV_VAR: TOKEN}, host="0.0.0.0") as service:
        assert httpx.get(f"{service.url}/v1/envs", timeout=30).status_code == 401
        with service.client() as http:
            assert http.get("/v1/envs").status_code == 200


def test_every_route_but_healthz_needs_the_token(service):
    anonymous = httpx.Client(base_url=service.url, timeout=60)
    wrong = service.client(token=WRONG)
    right = service.client()
    assert anonymous.get("/healthz").status_code == 200
    for method, path, body in [
        ("GET", "/v1/sessions", None),
        ("POST", "/v1/sessions", {"env_id": "eprl/CodeExec-v0"}),
        ("GET", f"/v1/sessions/{'0' * 32}", None),
        ("POST", f"/v1/sessions/{'0' * 32}/step", {"action": "x"}),
        ("DELETE", f"/v1/sessions/{'0' * 32}", None),
        ("GET", "/v1/envs", None),
        ("POST", "/v1/envs/describe", {"env_id": "eprl/CodeExec-v0"}),
        ("GET", "/metrics", None),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
        ("GET", "/no/such/route", None),
    ]:
        for client in (anonymous, wrong):
            response = client.request(method, path, json=body)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    for header in (f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer"):
        response = anonymous.get("/v1/sessions", headers={"Authorization": header})
        assert response.status_code == 401, header
    assert right.get("/v1/sessions").status_code == 200
    assert right.get("/docs").status_code == 200
    schema = right.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert schema["paths"]["/healthz"]["get"]["security"] == []


def test_remote_env_sends_the_token(service, monkeypatch):
    with pytest.raises(RemoteEnvError, match="HTTP 401"):
        gymnasium.make("eprl/Remote-v0", url=service.url, env_id="eprl/CodeExec-v0", token=WRONG)
    assert TOKEN_ENV_VAR == "EPRL_TOKEN"  # the name the docs give users
    monkeypatch.setenv(TOKEN_ENV_VAR, TOKEN)  # the default token source
    env = gymnasium.make("eprl/Remote-v0", url=service.url, env_id="eprl/CodeExec-v0")
    observation, info = env.reset(seed=0)
    env.step("```python\nprint(1)\n```")
    env.close()


def test_no_token_in_the_logs(service):
    """Runs last in this module: every request above is in the log by now."""
    with service.client() as http:
        http.get("/v1/sessions")
    with service.client(token=WRONG) as http:
        http.get("/v1/sessions")
    log = service.log()
    assert '"GET /v1/sessions HTTP/1.1" 200' in log and '"GET /v1/sessions HTTP/1.1" 401' in log
    assert TOKEN not in log and WRONG not in log


def test_create_app_keeps_the_token_out_of_its_schema():
    app = create_app(ServeSettings(token=TOKEN))
    assert TOKEN not in str(app.openapi())
