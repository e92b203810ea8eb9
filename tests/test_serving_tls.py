"""TLS straight from uvicorn: a certificate made in the test, RemoteEnv verifying it by a CA file."""

import secrets
import ssl

import gymnasium
import httpx
import pytest
from serving_server import make_tls_files, running_service

import envs  # noqa: F401  (registers the ids)
from serving.client import CA_FILE_ENV_VAR, RemoteEnvError

TOKEN = secrets.token_urlsafe(24)
CODEEXEC = "eprl/CodeExec-v0"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    files = make_tls_files(folder)
    with running_service(
        folder,
        ca_file=files["ca_file"],
        token=TOKEN,
        tls_certfile=files["certfile"],
        tls_keyfile=files["keyfile"],
    ) as service:
        yield service, files


def test_an_episode_over_https_verified_by_the_ca_file(tls):
    service, files = tls
    assert service.url.startswith("https://127.0.0.1:")
    env = gymnasium.make(
        "eprl/Remote-v0",
        url=service.url,
        env_id=CODEEXEC,
        token=TOKEN,
        ca_file=files["ca_file"],
        env_kwargs={"max_turns": 2},
    )
    env.reset(seed=0)
    observation, *_ = env.step("```python\nprint(6 * 7)\n```")
    assert observation.startswith("42\n")
    env.close()


def test_the_ca_file_can_come_from_the_environment(tls, monkeypatch):
    service, files = tls
    monkeypatch.setenv(CA_FILE_ENV_VAR, files["ca_file"])
    env = gymnasium.make("eprl/Remote-v0", url=service.url, env_id=CODEEXEC, token=TOKEN)
    env.reset(seed=1)
    env.close()


def test_an_unverified_certificate_is_refused(tls, tmp_path, monkeypatch):
    service, _ = tls
    monkeypatch.delenv(CA_FILE_ENV_VAR, raising=False)
    stranger = make_tls_files(tmp_path)["ca_file"]  # a CA that did not sign this certificate
    for ca_file in (None, stranger):  # the system's CAs, then the wrong CA
        with pytest.raises(RemoteEnvError, match="CERTIFICATE_VERIFY_FAILED"):
            # (the env's description may be cached from an earlier test: reset connects anyway)
            gymnasium.make(
                "eprl/Remote-v0",
                url=service.url,
                env_id=CODEEXEC,
                token=TOKEN,
                ca_file=ca_file,
                max_retries=0,
            ).reset(seed=0)
    with pytest.raises(ValueError, match="cannot load the CA file"):
        gymnasium.make(
            "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, ca_file=str(tmp_path / "none")
        )


def test_plain_http_gets_no_answer_from_the_tls_port(tls):
    service, files = tls
    plain = service.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/healthz", timeout=10)
    verify = ssl.create_default_context(cafile=files["ca_file"])
    assert httpx.get(f"{service.url}/healthz", verify=verify, timeout=10).status_code == 200
    assert TOKEN not in service.log()


def test_the_trainers_env_factory_verifies_by_env_ca_file(tls, monkeypatch):
    """``env.urls`` + ``env.ca_file`` in a run config: what ``eprl train`` uses for remote envs."""
    from trainer.config import load_config
    from trainer.tasks import make_env_factory

    service, files = tls
    monkeypatch.delenv(CA_FILE_ENV_VAR, raising=False)
    monkeypatch.setenv("EPRL_TEST_TLS_TOKEN", TOKEN)
    overrides = [f"env.id={CODEEXEC}", f"env.urls=[{service.url}]"]
    overrides.append("env.token_env=EPRL_TEST_TLS_TOKEN")
    unverified = make_env_factory(load_config(None, [*overrides, "env.kwargs.max_turns=2"]))
    with pytest.raises(RemoteEnvError, match="CERTIFICATE_VERIFY_FAILED"):
        unverified().reset(seed=0)  # without the CA file: the system's trust store refuses it
    cfg = load_config(None, [*overrides, f"env.ca_file={files['ca_file']}"])
    env = make_env_factory(cfg)()
    try:
        observation, _ = env.reset(seed=0)
        assert "python" in observation.lower()
    finally:
        env.close()
