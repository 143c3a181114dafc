"""Evaluation on Ray Data: the records equal a local run's, with 1 or 2 replicas and when a replica dies.

The replicas load a tiny pair saved to disk (Ray workers cannot import test modules); the local cluster
has 2 CPUs (the ``ray_cluster`` fixture), so each of 2 replicas gets one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from proxyalign.cli import main
from proxyalign.cluster import ReplicaResources
from proxyalign.errors import InvalidParameterError, ProxyAlignError
from proxyalign.eval import EvalConfig, evaluate
from proxyalign.eval.distributed import RayDecoder, RayOptions
from proxyalign.testing import save_tiny_pair

pytestmark = pytest.mark.slow

WORDS = ["w5 w6 w7", "w8 w9", "w10 w11 w12", "w13", "w14 w15", "w16 w17", "w18 w19", "w20"]
# What a run's placement may change: timings, and forward passes shared with whatever else was batched.
PLACEMENT = {"elapsed_s", "queued_s", "first_token_s", "tokens_per_s", "base_forwards", "aligned_forwards"}
PLACEMENT |= {"tokens_per_base_forward"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "question": q, "answer": "7"}) + "\n" for i, q in enumerate(WORDS))
    )
    return path


def _config(output: Path, data: Path, **overrides) -> EvalConfig:
    settings = dict(
        datasets=[("tiny", str(data))],
        methods=["base", "aligned", "confidence_bet"],
        limit=8,
        batch_size=3,
        max_new_tokens=6,
        temperature=1.0,
        output_dir=output,
        progress=False,
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def _comparable(records: list[dict]) -> dict[str, dict]:
    """Records by key, without what depends on where and beside what a question was decoded."""
    out = {}
    for record in records:
        stats = {k: v for k, v in record["stats"].items() if k not in PLACEMENT}
        out[record["key"]] = {**record, "stats": stats}
    return out


def _lines(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines()]


def _on_ray(replicas: int) -> RayOptions:
    return RayOptions(resources=ReplicaResources(replicas=replicas, num_cpus=2 / replicas))


@pytest.fixture(scope="module")
def local(pair, data, tmp_path_factory):
    """The reference: the same evaluation decoded in this process."""
    return evaluate(*pair, _config(tmp_path_factory.mktemp("local"), data), device="cpu")


def test_ray_records_equal_local_records_on_two_replicas(ray_cluster, pair, data, local, tmp_path):
    result = evaluate(*pair, _config(tmp_path, data), device="cpu", ray=_on_ray(2))
    assert len(local.records) == 24
    assert _comparable(result.records) == _comparable(local.records)
    assert len(_lines(tmp_path)) == 24
    assert (tmp_path / "report.md").exists()


def _replica_pids() -> list[int]:
    """The processes of the Ray Data actors holding an aligner (Ray titles them ``ray::MapWorker(...)``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::MapWorker(MapBatches(AlignerReplica))"):
            pids.append(int(entry.name))
    return pids


def test_a_replica_killed_mid_run_loses_and_duplicates_no_question(ray_cluster, pair, data, tmp_path):
    config = _config(tmp_path / "killed", data, max_new_tokens=40, batch_size=2)
    reference = evaluate(
        *pair, _config(tmp_path / "reference", data, max_new_tokens=40, batch_size=2), device="cpu"
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = evaluate(*pair, config, device="cpu", ray=_on_ray(2))
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    records = Path(config.output_dir) / "records.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and worker.is_alive():
        if records.exists() and records.read_text().count("\n") >= 2 and len(_replica_pids()) == 2:
            break
        time.sleep(0.05)
    victims = _replica_pids()
    written_at_kill = records.read_text().count("\n") if records.exists() else 0
    assert worker.is_alive() and victims, "the run ended before a replica could be killed"
    os.kill(victims[0], signal.SIGKILL)
    worker.join(timeout=240)
    assert not worker.is_alive(), "the run did not finish after a replica died"
    if "error" in outcome:
        raise outcome["error"]
    assert written_at_kill < 24
    lines = _lines(Path(config.output_dir))
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)) == 24
    assert _comparable(lines) == _comparable(reference.records)
    assert victims[0] not in _replica_pids()


def test_an_error_in_a_replica_reaches_the_caller_as_itself(ray_cluster, pair, monkeypatch):
    """A call that fails inside a replica (here: a criterion the replica cannot find) surfaces as the
    proxyalign error the replica raised, not as Ray's wrapper; while the caller keeps that error
    (``caught``, as a REPL keeps the last one) the failed run's actors give their CPUs back (Ray's
    error held them, and the next run waited for CPUs forever); the decoder then still decodes.

    Ray Data logs its error object itself; pytest's log capture keeps such records (and so the failed
    run's actors) until the test ends, which no ordinary logging handler does: not captured here."""
    from _pytest.logging import LogCaptureHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]  # Ray copies handlers
    for logger in loggers:
        if isinstance(logger, logging.Logger):
            kept = [h for h in logger.handlers if not isinstance(h, LogCaptureHandler)]
            monkeypatch.setattr(logger, "handlers", kept)

    def wait_for_free_cpus(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while ray_cluster.available_resources().get("CPU", 0) < ray_cluster.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, "the cluster's CPUs did not come back"
            time.sleep(0.5)

    wait_for_free_cpus(120)  # earlier tests' actor pools are gone
    decoder = RayDecoder(*pair, _on_ray(1), device="cpu")
    with pytest.raises(ProxyAlignError, match="no_such_criterion") as caught:
        list(decoder.as_completed([("w5 w6", {"criterion": "no_such_criterion", "max_new_tokens": 2})]))
    assert type(caught.value).__module__.startswith("proxyalign"), type(caught.value)
    wait_for_free_cpus(90)
    ((position, generation),) = decoder.as_completed([("w5 w6", {"max_new_tokens": 2, "seed": 0})])
    assert position == 0 and generation.stats.new_tokens == 2


def test_ray_options_are_checked_before_anything_starts(pair, data, tmp_path):
    with pytest.raises(InvalidParameterError, match="replicas must be an integer >= 1"):
        ReplicaResources(replicas=0)
    with pytest.raises(InvalidParameterError, match="num_gpus"):
        ReplicaResources(num_gpus=-1)
    with pytest.raises(ProxyAlignError, match=r"does not exist|not found|no such"):
        evaluate(str(tmp_path / "missing"), pair[1], _config(tmp_path, data), ray=RayOptions())


def test_cli_eval_on_one_replica_equals_local(ray_cluster, pair, data, local, tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "eval", "--base", pair[0], "--aligned", pair[1], "--device", "cpu",
        "--datasets", f"tiny={data}", "--methods", "base,aligned,confidence_bet", "--limit", "8",
        "--batch-size", "3", "--max-new-tokens", "6", "--temperature", "1.0",
        "--output", str(out), "--no-progress", "--ray", "--replicas", "1",
    ]  # fmt: skip
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    assert _comparable(_lines(out)) == _comparable(local.records)


def test_cli_ray_flags_need_ray_and_valid_values(capsys):
    assert main(["eval", "--base", "x", "--aligned", "y", "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main(["eval", "--base", "x", "--aligned", "y", "--ray", "--replicas", "0"]) == 2
    assert "replicas must be an integer >= 1" in capsys.readouterr().err
