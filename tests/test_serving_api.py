"""The environment service against the real eprl/CodeExec-v0: episodes, routes, limits, metrics.

One real uvicorn (a subprocess on a free loopback port) serves the module; tests that need other
settings (call timeout, idle reaping) start their own.
"""

import concurrent.futures
import time

import gymnasium
import psutil
import pytest
from gymnasium.utils.env_checker import check_env
from serving_server import is_alive, running_service

import envs  # noqa: F401  (registers the ids)
from envs.codeexec.tasks import load_task
from serving.client import SessionLostError

CODEEXEC = "eprl/CodeExec-v0"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(
        tmp_path_factory.mktemp("service"), max_sessions=6, max_body_bytes=65536
    ) as running:
        yield running


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def episode(env, task_set: str, seed: int, task_id: str | None, actions: list[str]) -> list:
    """reset + the actions (then the reference solution) until the episode ends."""
    options = {"task_id": task_id} if task_id else None
    observation, info = env.reset(seed=seed, options=options)
    transcript: list = [(observation, info)]
    reference = load_task(task_set, info["task_id"]).reference_solution
    for action in [*actions, fence("# submit\n" + reference)]:
        step = env.step(action)
        transcript.append(step)
        if step[2] or step[3]:
            break
    return transcript


EPISODES = [
    # (env kwargs, seed, task id, actions before the reference submission)
    ({}, 0, None, []),  # single turn, task drawn by the seed, solved
    ({}, 1, None, [fence("def nothing():\n    return None")]),  # single turn, wrong function
    ({}, 2, None, ["no code block at all"]),
    (
        {"max_turns": 4},
        3,
        None,
        [fence("x = 6 * 7\nprint(x)"), fence("print(x + 1)"), fence("raise ValueError('boom')")],
    ),
    ({"max_turns": 3}, 4, "proc/list/L2/17", [fence("import time\nprint(sorted([3, 1, 2]))")]),
    ({"max_turns": 3}, 5, None, ["x" * 5000]),  # over max_action_chars: truncated by the env
    ({"max_turns": 2}, 6, None, [fence("print('y' * 6000)")]),  # over the observation limit
    ({"task_set": "humaneval", "max_turns": 2}, 7, None, [fence("print(1)")]),
]


@pytest.mark.parametrize(("kwargs", "seed", "task_id", "actions"), EPISODES)
def test_remote_episode_equals_local(service, kwargs, seed, task_id, actions):
    task_set = kwargs.get("task_set", "procedural")
    local = gymnasium.make(CODEEXEC, **kwargs)
    remote = gymnasium.make("eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs=kwargs)
    try:
        expected = episode(local, task_set, seed, task_id, actions)
        got = episode(remote, task_set, seed, task_id, actions)
    finally:
        local.close()
        remote.close()
    assert got == expected
    assert got[-1][2] or got[-1][3], "the episode ended"


def test_remote_env_contract(service):
    local = gymnasium.make(CODEEXEC, max_turns=2)
    remote = gymnasium.make(
        "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 2}
    )
    try:
        assert remote.observation_space == local.observation_space
        assert remote.action_space == local.action_space
        assert remote.unwrapped.splits == local.unwrapped.splits
        for split in local.unwrapped.splits:
            assert remote.unwrapped.task_ids(split) == local.unwrapped.task_ids(split)
        with pytest.raises(ValueError, match="unknown split 'nope'"):
            remote.unwrapped.task_ids("nope")
        with pytest.raises(ValueError, match="not a procedural task id"):
            remote.reset(options={"task_id": "nope"})
        check_env(remote.unwrapped, skip_render_check=True)
    finally:
        local.close()
        remote.close()
        remote.close()  # twice is fine


def local_defaults(env_id: str, **kwargs) -> dict:
    """The budgets the local env declares; where it declares none, the fallback of the contract."""
    env = gymnasium.make(env_id, **kwargs)
    try:
        unwrapped = env.unwrapped
        if hasattr(unwrapped, "defaults"):
            return dict(unwrapped.defaults)
        max_turns = getattr(unwrapped, "max_turns", 1) or 1
        return {
            "max_turns": max_turns,
            "max_new_tokens": 512,
            "max_context_tokens": 2048 if max_turns == 1 else 16384,
            "max_parallel_episodes": None,
        }
    finally:
        env.close()


@pytest.mark.parametrize("kwargs", [{}, {"max_turns": 3}])
def test_remote_env_reports_the_served_env_defaults_before_reset(service, kwargs):
    remote = gymnasium.make("eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs=kwargs)
    try:
        assert remote.unwrapped.session_id is None  # no reset yet: known from /v1/envs/describe
        assert remote.unwrapped.defaults == local_defaults(CODEEXEC, **kwargs)
    finally:
        remote.close()


def test_catalogue_and_describe(service):
    from envs.codeexec import catalogue

    with service.client() as http:
        listed = {entry["env_id"]: entry for entry in http.get("/v1/envs").json()["envs"]}
        assert listed[CODEEXEC]["available"]
        assert listed[CODEEXEC]["entries"] == catalogue()
        assert "eprl/Remote-v0" not in listed  # never served: it would let clients pick URLs
        description = http.post(
            "/v1/envs/describe", json={"env_id": CODEEXEC, "env_kwargs": {"task_set": "humaneval"}}
        ).json()
        assert description["splits"] == ["test"]
        assert len(description["task_ids"]["test"]) == 164
        assert description["defaults"] == local_defaults(CODEEXEC, task_set="humaneval")


def is_alive_pid(pid: int) -> bool:
    try:
        return is_alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def error_of(response, status: int, error: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert "Traceback" not in response.text
    return body


def wait_for_status(http, session_id: str, status: str, call, timeout_s: float = 60.0) -> None:
    """Poll the session until it shows ``status`` (fails if ``call`` ends first or time runs out)."""
    deadline = time.monotonic() + timeout_s
    while http.get(f"/v1/sessions/{session_id}").json()["status"] != status:
        assert not call.done(), f"the call ended before the session showed {status!r}"
        assert time.monotonic() < deadline, f"session {session_id} never showed {status!r}"
        time.sleep(0.01)


def test_session_routes_and_errors(service):
    with service.client() as http:
        created = http.post(
            "/v1/sessions", json={"env_id": CODEEXEC, "env_kwargs": {"max_turns": 3}}
        )
        assert created.status_code == 201, created.text
        session = created.json()
        sid = session["session_id"]
        assert session["limits"]["max_body_bytes"] == 65536
        assert session["observation_space"]["type"] == "Text"
        assert sid in [s["session_id"] for s in http.get("/v1/sessions").json()["sessions"]]

        reset = http.post(f"/v1/sessions/{sid}/reset", json={"seed": 3}).json()
        assert reset["info"]["turn"] == 0
        step = http.post(f"/v1/sessions/{sid}/step", json={"action": fence("print(2 + 2)")}).json()
        assert step["observation"].startswith("4\n") and step["reward"] == 0.0
        state = http.get(f"/v1/sessions/{sid}").json()
        assert (state["episodes"], state["steps"], state["turn"]) == (1, 1, 1)
        assert state["task_id"] == reset["info"]["task_id"]
        # CodeExec cannot grade a cut episode: said so, nothing invented
        cut = http.post(f"/v1/sessions/{sid}/truncate", json={"reason": "max_turns"}).json()
        assert cut == {"graded": False, "reward": 0.0, "info": {}}
        bad = http.post(f"/v1/sessions/{sid}/truncate", json={"reason": "Not A Reason"})
        assert "body.reason" in error_of(bad, 422, "invalid_request")["detail"]

        # every client error is a 4xx JSON body naming the problem
        body = error_of(
            http.post(f"/v1/sessions/{sid}/step", json={"action": "x" * 70000}),
            413,
            "body_too_large",
        )
        assert "65536 bytes" in body["detail"]
        chunks = (b"x" * 8192 for _ in range(9))  # no Content-Length: caught while reading
        chunked = http.post(f"/v1/sessions/{sid}/step", content=chunks)
        assert error_of(chunked, 413, "body_too_large")["detail"] == body["detail"]
        body = error_of(http.post(f"/v1/sessions/{sid}/step", json={}), 422, "invalid_request")
        assert "body.action" in body["detail"]
        error_of(http.post(f"/v1/sessions/{sid}/step", json={"action": 7}), 422, "invalid_request")
        error_of(
            http.post(f"/v1/sessions/{sid}/step", json={"action": "a", "x": 1}),
            422,
            "invalid_request",
        )
        surrogate = b'{"action": "\\ud800"}'
        body = error_of(
            http.post(
                f"/v1/sessions/{sid}/step",
                content=surrogate,
                headers={"content-type": "application/json"},
            ),
            422,
            "invalid_request",
        )
        assert "unicode" in body["detail"].lower()
        error_of(
            http.post(
                f"/v1/sessions/{sid}/step",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            422,
            "invalid_request",
        )
        error_of(http.post(f"/v1/sessions/{sid}/reset", json={"seed": -1}), 422, "invalid_request")
        error_of(
            http.post(f"/v1/sessions/{sid}/reset", json={"options": {"other": 1}}),
            422,
            "invalid_request",
        )
        body = error_of(
            http.post(f"/v1/sessions/{sid}/reset", json={"options": {"task_id": "proc/nope"}}),
            422,
            "env_error",
        )
        assert body["exception"] == "ValueError" and body["session_id"] == sid
        error_of(http.get("/v1/sessions/not-a-session-id"), 422, "invalid_request")
        error_of(http.get(f"/v1/sessions/{'0' * 32}"), 404, "session_not_found")
        error_of(http.get("/v1/nowhere"), 404, "not_found")
        response = http.put("/v1/sessions")
        error_of(response, 405, "method_not_allowed")
        assert response.headers["allow"] == "GET, POST"

        # kwargs are checked against the env's constructor; server-pinned ones are refused
        body = error_of(
            http.post("/v1/sessions", json={"env_id": CODEEXEC, "env_kwargs": {"max_turn": 3}}),
            422,
            "invalid_request",
        )
        assert "max_turn" in body["detail"]
        body = error_of(
            http.post(
                "/v1/sessions",
                json={"env_id": CODEEXEC, "env_kwargs": {"sandbox": {"mode": "rlimits-only"}}},
            ),
            422,
            "invalid_request",
        )
        assert "sandbox" in body["detail"]
        error_of(
            http.post("/v1/sessions", json={"env_id": "eprl/Remote-v0"}), 422, "invalid_request"
        )
        body = error_of(
            http.post("/v1/sessions", json={"env_id": CODEEXEC, "env_kwargs": {"max_turns": 0}}),
            422,
            "env_create_failed",
        )
        assert "max_turns must be an int >= 1" in body["detail"]

        # one call at a time per session: a second concurrent call gets 409 (sent once the
        # session shows the first call running, not after a guessed sleep)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                http.post,
                f"/v1/sessions/{sid}/step",
                json={"action": fence("import time; time.sleep(1.5)")},
            )
            wait_for_status(http, sid, "busy", slow)
            error_of(
                http.post(f"/v1/sessions/{sid}/step", json={"action": fence("1")}),
                409,
                "session_busy",
            )
            assert slow.result().status_code == 200

        assert http.delete(f"/v1/sessions/{sid}").json() == {"session_id": sid, "closed": True}
        body = error_of(
            http.post(f"/v1/sessions/{sid}/step", json={"action": "a"}), 410, "session_closed"
        )
        assert "closed by its client" in body["detail"]


def test_metrics(service):
    remote = gymnasium.make("eprl/Remote-v0", url=service.url, env_id=CODEEXEC)
    remote.reset(seed=0)
    remote.step("no code")
    remote.close()
    with service.client() as http:
        text = http.get("/metrics").text
    for needle in (
        "eprl_sessions_active ",
        "eprl_sessions_max 6.0",
        'eprl_env_steps_total{env_id="eprl/CodeExec-v0"}',
        'eprl_env_call_seconds_bucket{le="0.005",op="step"}',
        'eprl_http_requests_total{method="POST",route="/v1/sessions/{session_id}/step",status="200"}',
        'eprl_sessions_ended_total{reason="client"}',
    ):
        assert needle in text, needle


@pytest.fixture(scope="module")
def short_calls(tmp_path_factory):
    """A second service whose steps time out after 2 s; its resets (which may start a sandbox
    cold on a loaded machine) get 120 s, so only the step under test can time out."""
    with running_service(
        tmp_path_factory.mktemp("short"), call_timeout_s=2.0, reset_timeout_s=120.0
    ) as running:
        yield running


def test_call_timeout_ends_the_session(short_calls):
    service = short_calls
    remote = gymnasium.make(
        "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 3}
    )
    remote.reset(seed=0)
    session_id = remote.unwrapped.session_id
    with service.client() as http:
        session = http.get(f"/v1/sessions/{session_id}").json()
        assert session["limits"]["call_timeout_s"] == 2.0
        assert session["limits"]["reset_timeout_s"] == 120.0
        pid = session["worker_pid"]
    with pytest.raises(SessionLostError, match="step did not finish within 2 s") as lost:
        remote.step(fence("import time; time.sleep(8)"))
    assert lost.value.session_id == session_id and lost.value.status == 504
    assert not is_alive_pid(pid)
    with service.client() as http:  # a step is never retried: the service saw it once
        step_504 = 'route="/v1/sessions/{session_id}/step",status="504"} 1.0'
        assert step_504 in http.get("/metrics").text
    observation, info = remote.reset(seed=0)  # a new session
    assert remote.unwrapped.session_id != session_id and info["turn"] == 0
    remote.close()


def test_idle_sessions_are_reaped(tmp_path):
    with running_service(tmp_path, idle_timeout_s=3.0, reap_interval_s=0.25) as service:
        remote = gymnasium.make(
            "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 2}
        )
        remote.reset(seed=0)
        remote.step(fence("print(1)"))  # the session now holds a sandbox process too
        with service.client() as http:
            pid = http.get(f"/v1/sessions/{remote.unwrapped.session_id}").json()["worker_pid"]
            deadline = time.monotonic() + 30
            while http.get("/v1/sessions").json()["active"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http.get("/v1/sessions").json()["active"] == 0
        assert not is_alive_pid(pid)
        with pytest.raises(SessionLostError, match="after 3 s without calls"):
            remote.step(fence("print(2)"))
        remote.close()


def test_shutdown_closes_every_environment(tmp_path):
    """SIGTERM with live sessions (workers + sandbox REPLs): everything exits (checked on exit)."""
    with running_service(tmp_path) as service:
        remotes = [
            gymnasium.make(
                "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 3}
            )
            for _ in range(3)
        ]
        for seed, remote in enumerate(remotes):
            remote.reset(seed=seed)
            remote.step(fence("print('alive')"))
        names = {process.name() for process in service.descendants()}
        assert "bwrap" in names, names
    assert service.process.returncode == 0  # SIGTERM is the drained, clean exit
    log = service.log()
    assert log.count("ended (shutdown)") == 3, log[-2000:]
    assert "Traceback" not in log


def test_sessions_spread_over_replicas_and_a_stopped_replica_loses_only_its_own(service, tmp_path):
    with running_service(tmp_path, max_sessions=6) as second:
        urls = [service.url, second.url]
        remotes = [gymnasium.make("eprl/Remote-v0", url=urls, env_id=CODEEXEC) for _ in range(4)]
        for seed, remote in enumerate(remotes):
            remote.reset(seed=seed)
        replicas = [remote.unwrapped.session_url for remote in remotes]
        assert sorted(replicas) == sorted(urls * 2), replicas  # least-loaded: 2 and 2
    # the second replica is gone (as in a restart): its sessions report it, the others go on
    on_second = [remote for remote in remotes if remote.unwrapped.session_url == second.url]
    for remote in remotes:
        if remote is on_second[0]:  # mid-episode: the step fails, naming session and replica
            session_id = remote.unwrapped.session_id
            with pytest.raises(SessionLostError, match=f"session {session_id} .* is lost") as lost:
                remote.step("no code")
            assert lost.value.session_id == session_id and lost.value.replica == second.url
        elif remote is on_second[1]:  # between episodes: the next reset moves, nothing lost
            remote.reset(seed=5)
            assert remote.unwrapped.session_url == service.url
        else:
            assert remote.step("no code")[2]  # terminated: graded, 0 reward
    fresh = gymnasium.make("eprl/Remote-v0", url=urls, env_id=CODEEXEC)
    fresh.reset(seed=0)
    assert fresh.unwrapped.session_url == service.url
    for remote in [*remotes, fresh]:
        remote.close()
