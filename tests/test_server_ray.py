"""``proxyalign serve --ray``: the same OpenAI-compatible app as Ray Serve replicas, driven by the same
clients as the plain server.

The command runs as a user runs it (a subprocess) against this module's local Ray cluster (the
``ray_cluster`` fixture, 2 CPUs): two replicas of half a CPU each load a tiny pair saved to disk, Serve's
HTTP proxy listens on a free loopback port, and several of the plain server's client tests run against
it unchanged. Its option checks run in-process and must fail before Ray starts or a model loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from proxyalign.cli import main as cli_main
from proxyalign.engine.scheduler import SchedulerConfig
from proxyalign.server import ServerConfig, create_app
from proxyalign.testing import save_tiny_pair
from tests import test_server as plain
from tests.test_server import BAD_REQUESTS, KEY, MODEL, chat, free_port

#: The limits of the plain server's tests that flags can set (its CONFIG's, but room for a long stream).
LIMITS = {
    "--max-tokens": 240,
    "--default-max-tokens": 8,
    "--max-n": 4,
    "--max-prompt-tokens": 100,
    "--max-body-bytes": 16_384,
}
CONFIG = ServerConfig(
    api_key=KEY,
    max_tokens=240,
    default_max_tokens=8,
    max_n=4,
    max_prompt_tokens=100,
    max_body_bytes=16_384,
)
#: The plain server's bad requests, less the two whose limits (max_prompts, max_stop) no flag sets.
FLAG_LIMITED = {"too many prompts", "too many stop strings"}
SERVE_BAD_REQUESTS = [case for case in BAD_REQUESTS if case[0] not in FLAG_LIMITED]


# -- the options, checked before Ray starts or a model loads -------------------------------------------
@pytest.fixture
def ray_must_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tripwire: starting or joining a cluster here is a test failure (status 1, not 2)."""
    ray = pytest.importorskip("ray")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray must not start before every option is checked")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ray", "--replicas", "0"], "replicas must be an integer >= 1, got 0"),
        (["--ray", "--autoscaling", "[1, 4]"], "--autoscaling must be a JSON object"),
        (["--ray", "--autoscaling", "{min_replicas: 1}"], "--autoscaling is not valid JSON"),
        (["--ray", "--autoscaling", '{"max_replica": 4}'], "unknown key(s) max_replica"),
        (["--ray", "--autoscaling", '{"min_replicas": 3, "max_replicas": 2}'], "--autoscaling: "),
        (["--ray", "--num-gpus-per-replica", "-1"], "num_gpus (per replica) must be >= 0"),
        (["--replicas", "2"], "--replicas needs --ray"),
        (["--autoscaling", "{}"], "--autoscaling needs --ray"),
        (["--ray", "--port", "0"], "--port 0"),
        (["--ray", "--host", "0.0.0.0"], "--api-key"),  # the plain server's rules apply unchanged
        (["--ray", "--criterion", "nope"], "nope"),
        (["--ray"], "does not exist"),  # the models are checked before Ray starts
    ],
)
def test_ray_options_are_checked_before_anything_starts(ray_must_not_start, capsys, args, message):
    status = cli_main(["serve", "--base", "/no/such/model", "--aligned", "/no/such/either", *args])
    assert status == 2
    assert message in capsys.readouterr().err


def test_replicas_and_autoscaling_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(
            ["serve", "--base", "b", "--aligned", "a", "--ray", "--replicas", "2", "--autoscaling", "{}"]
        )
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_without_ray_it_says_what_to_install(monkeypatch, capsys):
    for name in ("ray", "ray.serve"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import ray` meets when it is not installed
    assert cli_main(["serve", "--base", "/no/such/model", "--aligned", "/no/such/either", "--ray"]) == 2
    error = capsys.readouterr().err
    assert "proxyalign serve --ray needs Ray, which is not installed: pip install 'proxyalign[ray]'" in error


def test_a_replica_loads_with_the_default_mode_and_measures_auto_before_serving(tmp_path):
    """What ``--mode auto --calibrate-rows 2`` gives each replica: the pair's requests default to auto,
    and its forward costs up to 2 rows are known before the first request (PairSpec.load runs in the
    replica; here in this process, the same code)."""
    from proxyalign import GenerationConfig
    from proxyalign.server.ray_serve import PairSpec

    base, aligned = save_tiny_pair(tmp_path)
    pair = PairSpec(base, aligned, generation_config=GenerationConfig(mode="auto", gamma=3), calibrate_rows=2)
    aligner = pair.load()
    try:
        assert (aligner.defaults.mode, aligner.defaults.gamma) == ("auto", 3)
        measured = {(role, rows) for role, rows, _ in aligner.engine.costs.known()}
        assert {rows for _, rows in measured} == {1, 2}
        assert max(positions for *_, positions in aligner.engine.costs.known()) == 7, "gamma 6 + 1"
    finally:
        aligner.close()


def test_scaling_limits_and_resources_reach_the_deployment():
    pytest.importorskip("ray")
    from proxyalign.cluster import ReplicaResources
    from proxyalign.server.ray_serve import PairSpec, Replicas, build_app, deployment, deployment_options

    pair = PairSpec("b", "a", scheduler=SchedulerConfig(max_rows=16))
    config = ServerConfig(max_waiting=24, drain_s=7)
    autoscaling = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 12}
    replicas = Replicas(ReplicaResources(replicas=3), autoscaling)
    options = deployment_options(pair, config, replicas, num_cpus=2, num_gpus=0.5)
    assert options["num_replicas"] == "auto" and options["autoscaling_config"] == autoscaling
    assert options["graceful_shutdown_timeout_s"] == 7, "--drain-seconds"
    scaled = deployment(pair, config, replicas, num_cpus=2, num_gpus=0.5)  # Serve accepts them
    assert scaled.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.5}
    assert scaled.max_ongoing_requests >= 16 + 24, "Serve must not throttle below the engine's limits"
    fixed = deployment(pair, config, Replicas(ReplicaResources(replicas=3)), num_cpus=1, num_gpus=0)
    assert fixed.num_replicas == 3 and fixed.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}
    assert type(build_app(pair, config, Replicas())).__name__ == "Application"


# -- the replicas, behind Serve's proxy ----------------------------------------------------------------
class Served:
    """``proxyalign serve --ray ADDRESS --replicas 2`` in a subprocess, its log in a file."""

    def __init__(self, address: str, base: str, aligned: str, log: Path) -> None:
        self.port = free_port()
        self.log = log
        command = [sys.executable, "-m", "proxyalign.cli", "serve", "--base", base, "--aligned", aligned]
        command += ["--criterion", "dual_kad", "--device", "cpu", "--port", str(self.port)]
        command += [str(x) for flag_value in LIMITS.items() for x in flag_value]
        command += ["--ray", address, "--replicas", "2", "--num-cpus-per-replica", "0.5"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROXYALIGN_API_KEY": KEY}
        with log.open("w") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_until_serving(self, timeout: float = 150) -> None:
        """``serve.run`` returns (and the command logs its URL) once every replica has loaded."""
        deadline = time.monotonic() + timeout
        while "serving 'proxyalign' at" not in self.log.read_text():
            assert self.process.poll() is None, f"the command exited:\n{self.log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving yet:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> tuple[str, str]:
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def pa(pair_dirs):
    """The pair every replica loads, loaded here: what each answer must equal."""
    from proxyalign import ProxyAligner

    aligner = ProxyAligner.from_pretrained(*pair_dirs, criterion="dual_kad", device="cpu")
    yield aligner
    aligner.close()


@pytest.fixture(scope="module")
def live(ray_cluster, pair_dirs, tmp_path_factory) -> Iterator[Served]:
    address = ray_cluster.get_runtime_context().gcs_address
    served = Served(address, *pair_dirs, log=tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        served.wait_until_serving()
        yield served
    finally:
        served.stop()


def test_two_replicas_run_behind_the_proxy(live, client, pa):
    from ray import serve

    application = serve.status().applications["proxyalign"]
    assert application.status == "RUNNING"
    assert application.deployments["ProxyAligner"].replica_states == {"RUNNING": 2}
    expected = pa.generate([chat("w5 w6")], temperature=0, max_new_tokens=8)[0].text
    answers = {
        client.chat.completions.create(model=MODEL, messages=chat("w5 w6"), temperature=0, max_tokens=8)
        .choices[0]
        .message.content
        for _ in range(6)
    }
    assert answers == {expected}, "every replica answers as the pair alone"


# The plain server's ``client`` (openai) and ``http`` (httpx) fixtures: they ask for ``live``, which here
# is the Serve deployment.
client = plain.client
http = plain.http

# The plain server's client tests, collected here once more: the fixtures they ask for (live, client,
# http, pa) are this module's, so the same bodies run against the Serve deployment.
test_models_health_and_metrics = plain.test_models_health_and_metrics
test_chat_and_completion_equal_the_aligner_alone = plain.test_chat_and_completion_equal_the_aligner_alone
test_streams_reassemble_to_the_unstreamed_text = plain.test_streams_reassemble_to_the_unstreamed_text
test_extensions_and_n_choices_reach_the_aligner = plain.test_extensions_and_n_choices_reach_the_aligner
test_malformed_requests_auth_size_and_method = plain.test_malformed_requests_auth_size_and_method


@pytest.fixture(scope="module")
def plain_app(pa):
    """The plain server's app with the same limits, in-process: what each error must equal."""
    with TestClient(create_app(pa, CONFIG), headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.mark.parametrize(
    ("name", "path", "body", "status", "field"), SERVE_BAD_REQUESTS, ids=[c[0] for c in SERVE_BAD_REQUESTS]
)
def test_every_bad_request_gets_the_plain_servers_answer(http, plain_app, name, path, body, status, field):
    content = json.dumps(body)
    served = http.post(path, content=content)
    alone = plain_app.post(path, content=content, headers={"Content-Type": "application/json"})
    assert served.status_code == status, served.text
    assert (served.status_code, served.json()) == (alone.status_code, alone.json())
    assert field in served.json()["error"]["message"]


def test_sigterm_drains_the_replicas_removes_serve_and_exits_0(live):
    """Last: a stream running at SIGTERM still finishes (the proxy outlives the replicas' drain), Serve
    is shut down, the command exits 0 and the port closes."""
    body = {"model": MODEL, "prompt": "w9 w10", "max_tokens": 240, "seed": 1, "stream": True}
    lines: list[str] = []

    def stream() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines.extend(plain.sse_lines(r))

    reader = threading.Thread(target=stream)
    reader.start()
    plain.wait_until(lambda: len(lines) >= 3)
    live.process.send_signal(signal.SIGTERM)
    reader.join(60)
    assert lines[-1] == "[DONE]" and len(lines) > 50, f"the stream was cut after {len(lines)} events"
    assert live.process.wait(timeout=60) == 0, live.log.read_text()[-4000:]
    assert "stopping: the replicas finish their requests" in live.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{live.url}/health")
