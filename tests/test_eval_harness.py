"""The evaluation loop: records, reports, resume after an interruption, margin tuning, the CLI."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
from scipy import stats as scipy_stats

from proxyalign.cli import main
from proxyalign.engine.results import FinishReason, Generation, GenerationStats, Source
from proxyalign.errors import ProxyAlignError
from proxyalign.eval import (
    EvalConfig,
    mcnemar_exact,
    paired_comparisons,
    parse_methods,
    parse_sweep,
    report_directory,
    run_eval,
    wilson_interval,
)
from proxyalign.eval.methods import Method, resolve_method
from proxyalign.eval.runner import provenance, question_seed
from proxyalign.testing import save_tiny_pair

WORDS = ["w5 w6 w7", "w8 w9", "w10 w11 w12", "w13", "w14 w15", "w16 w17", "w18 w19", "w20"]


@pytest.fixture
def tiny_data(tmp_path):
    """Six numeric questions in the tiny tokenizer's words (answers are arbitrary)."""
    path = tmp_path / "tiny.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "question": q, "answer": "7"}) + "\n" for i, q in enumerate(WORDS))
    )
    return path


def _config(tmp_path, data, **overrides):
    settings = dict(
        datasets=[("tiny", str(data))],
        methods=["base", "confidence_bet"],
        limit=4,
        batch_size=2,
        max_new_tokens=4,
        temperature=1.0,
        output_dir=tmp_path / "out",
        progress=False,
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def _lines(directory):
    return [json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines()]


# -- methods, sweeps, small pieces -----------------------------------------------------------------
def test_parse_methods_syntax_resolves_defaults_and_dedupes():
    methods = parse_methods(
        ["base,aligned,confidence_bet[margin=0.1]", "dual_kad,confidence_bet[margin=0.1]"]
    )
    assert [m.label for m in methods] == [
        "base",
        "aligned",
        "confidence_bet[margin=0.1]",
        "dual_kad[threshold=0.4]",
    ]
    assert methods[2].pinned == ("margin",) and methods[3].pinned == ()
    assert parse_methods("primal_kad[alpha=0.2]")[0].param_dict == {"alpha": 0.2}
    with pytest.raises(ProxyAlignError, match=r"no_such_criterion"):
        parse_methods("no_such_criterion")
    with pytest.raises(ProxyAlignError):
        parse_methods("confidence_bet[margin=7]")  # out of range
    with pytest.raises(ProxyAlignError, match="NAME=VALUE"):
        parse_methods("confidence_bet[margin]")


def test_sweep_maps_onto_each_criterions_own_parameter():
    sweep = parse_sweep("margin=0,0.1,0.2")
    assert sweep.values == (0.0, 0.1, 0.2) and sweep.criterion is None
    cb, kad, primal, nudging, base = parse_methods("confidence_bet,dual_kad,primal_kad,nudging,base")
    assert sweep.target(cb) == "margin"
    assert sweep.target(kad) == "threshold"
    assert sweep.target(primal) == "alpha"
    assert sweep.target(nudging) == "threshold"
    assert sweep.target(base) is None
    assert parse_sweep("lambda=0.3").target(kad) == "threshold"
    assert sweep.target(parse_methods("confidence_bet[margin=0.1]")[0]) is None  # pinned by the user
    qualified = parse_sweep("dual_kad.threshold=0.2,0.4")
    assert qualified.target(kad) == "threshold" and qualified.target(cb) is None
    with pytest.raises(ProxyAlignError, match="PARAM=V1"):
        parse_sweep("margin")


def test_mcnemar_exact_matches_the_binomial_test():
    for wins, losses in [(10, 2), (5, 0), (7, 7), (0, 3), (30, 18)]:
        expected = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert mcnemar_exact(wins, losses) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)


def test_paired_comparisons_count_questions_both_answered():
    def record(method, qid, correct, seed=0):
        return {
            "dataset": "d",
            "split": "test",
            "method": method,
            "id": qid,
            "seed": seed,
            "correct": correct,
        }

    records = [record("base", i, i < 3) for i in range(6)] + [
        record("aligned", i, i % 2 == 0) for i in range(6)
    ]
    records += [record("x", i, i >= 2) for i in range(5)]  # question 5 not answered yet
    pairs = {(p.method, p.baseline): p for p in paired_comparisons(records)}
    vs_base = pairs[("x", "base")]
    assert (vs_base.n, vs_base.wins, vs_base.losses) == (5, 2, 2)  # wins on 3, 4; losses on 0, 1
    vs_aligned = pairs[("x", "aligned")]
    assert (vs_aligned.n, vs_aligned.wins, vs_aligned.losses) == (5, 1, 1)  # win on 3, loss on 0
    # the two baselines are compared once (q* alone against p alone), never with themselves
    assert ("aligned", "base") in pairs and ("base", "aligned") not in pairs and ("base", "base") not in pairs


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.32
    low, high = wilson_interval(25, 50)
    assert low == pytest.approx(0.3664, abs=1e-3) and high == pytest.approx(0.6336, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_question_seed_and_provenance():
    assert question_seed(0, "gsm8k", "test", "q0") == question_seed(0, "gsm8k", "test", "q0")
    seeds = {question_seed(s, d, "test", q) for s in (0, 1) for d in ("a", "b") for q in ("q0", "q1")}
    assert len(seeds) == 8
    assert provenance([Source.BASE, Source.BASE, Source.ALIGNED, Source.BASE]) == "p2 q1 p1"


# -- the loop with the real engine on tiny models --------------------------------------------------
def test_run_writes_records_and_reports_with_same_questions_and_seeds(aligner, tmp_path, tiny_data):
    result = run_eval(aligner, _config(tmp_path, tiny_data, methods=["base", "aligned", "confidence_bet"]))
    records = _lines(result.output_dir)
    assert len(records) == 12 and result.new_instances == 12
    by_method = {
        m: [r for r in records if r["method"] == m] for m in ("base", "aligned", "confidence_bet[margin=0.2]")
    }
    ids = [[r["id"] for r in rows] for rows in by_method.values()]
    assert ids[0] == ids[1] == ids[2] == ["tiny-0", "tiny-1", "tiny-2", "tiny-3"]
    seeds = [[r["question_seed"] for r in rows] for rows in by_method.values()]
    assert seeds[0] == seeds[1] == seeds[2] and len(set(seeds[0])) == 4
    record = by_method["confidence_bet[margin=0.2]"][0]
    for field in (
        "output",
        "extracted",
        "gold",
        "correct",
        "sources",
        "provenance",
        "stats",
        "finish_reason",
    ):
        assert field in record
    assert record["stats"]["new_tokens"] == sum(record["sources"].values())
    assert all(r["sources"] == {"aligned": r["stats"]["new_tokens"]} for r in by_method["aligned"])
    assert all(set(r["sources"]) == {"base"} for r in by_method["base"])
    report = result.report_path.read_text()
    assert (
        "| p alone (`base`) | 4 |" in report
        and "95% CI" in report
        and "`confidence_bet[margin=0.2]`" in report
    )
    summary = json.loads((result.output_dir / "summary.json").read_text())
    rows = {s["method"]: s for s in summary["summaries"]}
    assert rows["base"]["rejection_rate"] == 0.0 and rows["aligned"]["from_aligned"] == 1.0
    assert rows["confidence_bet[margin=0.2]"]["tokens_per_s"] > 0
    # a second run has nothing left to do and changes nothing
    again = run_eval(aligner, _config(tmp_path, tiny_data, methods=["base", "aligned", "confidence_bet"]))
    assert again.new_instances == 0 and _lines(result.output_dir) == records


class Interrupting:
    """Lets ``after`` requests finish, then raises KeyboardInterrupt (a Ctrl-C mid-run)."""

    def __init__(self, inner, after):
        self.inner, self.after = inner, after
        self.names = inner.names

    def as_completed(self, calls, in_flight):
        for done, item in enumerate(self.inner.as_completed(calls, in_flight=in_flight)):
            if done >= self.after:
                raise KeyboardInterrupt
            yield item


def test_interrupted_run_resumes_without_duplicates_and_with_the_same_results(aligner, tmp_path, tiny_data):
    reference = run_eval(aligner, _config(tmp_path, tiny_data, output_dir=tmp_path / "ref"))
    expected = {r["key"]: r["output"] for r in reference.records}
    assert len(expected) == 8

    config = _config(tmp_path, tiny_data, output_dir=tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_eval(Interrupting(aligner, after=6), config)  # 6 of 8 (question, method) pairs done
    partial = _lines(tmp_path / "resumed")
    assert len(partial) == 6
    # a crash in the middle of writing: the last record is cut in half, the one before lost
    path = tmp_path / "resumed" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-1][: len(lines[-1]) // 2])

    resumed = run_eval(aligner, config)
    records = _lines(tmp_path / "resumed")
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 8
    assert resumed.new_instances == 4
    assert {r["key"]: r["output"] for r in records} == expected


def test_resume_refuses_a_different_configuration(aligner, tmp_path, tiny_data):
    run_eval(aligner, _config(tmp_path, tiny_data, limit=2, methods=["base"]))
    with pytest.raises(ProxyAlignError, match=r"another configuration.*max_new_tokens"):
        run_eval(aligner, _config(tmp_path, tiny_data, limit=2, methods=["base"], max_new_tokens=5))


# -- margin tuning with a scripted aligner ---------------------------------------------------------
class Scripted:
    """A stand-in for ProxyAligner whose answers are right only for chosen criterion parameters."""

    def __init__(self, right):
        self.names = {"base": "scripted-p", "aligned": "scripted-q"}
        self.right = right  # criterion -> the parameter value that answers correctly
        self.calls = []

    def as_completed(self, calls, in_flight):
        for position, (prompt, options) in enumerate(calls):
            yield position, self.generate([prompt], **options)[0]

    def generate(self, prompts, **options):
        self.calls.append(options)
        params = options["criterion_params"]
        good = self.right.get(options["criterion"]) in params.values()
        rejected = int(10 * next(iter(params.values()), 0))
        text = "So the answer is 7." if good else "So the answer is 1."
        stats = GenerationStats(new_tokens=10, tokens_from_base=10 - rejected, tokens_from_aligned=rejected,
                                drafts=10, rejected_drafts=rejected, elapsed_s=0.01)  # fmt: skip
        sources = [Source.BASE] * (10 - rejected) + [Source.ALIGNED] * rejected
        return [Generation(text, [5] * 10, sources, FinishReason.EOS, stats=stats) for _ in prompts]


def test_sweep_picks_the_argmax_on_dev_and_reports_test(tmp_path, tiny_data):
    scripted = Scripted({"confidence_bet": 0.1, "dual_kad": 0.2})
    config = _config(
        tmp_path,
        tiny_data,
        methods=["base", "confidence_bet", "dual_kad"],
        sweeps=["margin=0,0.1,0.2"],
        dev=2,
        limit=3,
    )
    result = run_eval(scripted, config)
    tuned = {info["criterion"]: info for info in result.tuned.values()}
    assert tuned["confidence_bet"]["value"] == 0.1 and tuned["dual_kad"]["value"] == 0.2
    assert tuned["confidence_bet"]["dev_accuracy"] == {"0": 0.0, "0.1": 1.0, "0.2": 0.0}
    records = result.records
    dev_ids = {r["id"] for r in records if r["split"] == "dev"}
    test_ids = {r["id"] for r in records if r["split"] == "test"}
    assert dev_ids == {"tiny-6", "tiny-7"} and test_ids == {"tiny-0", "tiny-1", "tiny-2"}
    test_methods = Counter(r["method"] for r in records if r["split"] == "test")
    assert test_methods == {"base": 3, "confidence_bet[margin=0.1]": 3, "dual_kad[threshold=0.2]": 3}
    assert Counter(r["method"] for r in records if r["split"] == "dev") == {
        f"{c}[{p}={v}]": 2
        for c, p in (("confidence_bet", "margin"), ("dual_kad", "threshold"))
        for v in (0, 0.1, 0.2)
    }
    chosen = [s for s in result.summaries if s.chosen]
    assert {s.method for s in chosen} == {"confidence_bet[margin=0.1]", "dual_kad[threshold=0.2]"}
    assert all(s.accuracy == 1.0 and s.split == "test" for s in chosen)
    report = result.report_path.read_text()
    assert "Tuning on the dev split" in report and "(tuned on dev)" in report
    if importlib.util.find_spec("matplotlib"):
        assert result.plot_path is not None and result.plot_path.stat().st_size > 1000
    # rebuilding the reports from the records alone gives the same table
    rebuilt = report_directory(result.output_dir)
    assert [s.as_dict() for s in rebuilt.summaries] == [s.as_dict() for s in result.summaries]


def test_sweep_without_dev_runs_every_value_on_test_and_plots(tmp_path, tiny_data):
    result = run_eval(
        Scripted({"confidence_bet": 0.2}),
        _config(
            tmp_path,
            tiny_data,
            datasets=f"tiny={tiny_data}",  # the CLI's NAME=PATH form works in Python too
            methods=["base", "aligned", "confidence_bet"],
            sweeps=["margin=0,0.2"],
        ),
    )
    methods = {s.method: s for s in result.summaries}
    assert set(methods) == {"base", "aligned", "confidence_bet[margin=0]", "confidence_bet[margin=0.2]"}
    assert methods["confidence_bet[margin=0.2]"].accuracy == 1.0
    assert methods["confidence_bet[margin=0.2]"].rejection_rate == pytest.approx(0.2)
    if importlib.util.find_spec("matplotlib"):
        assert result.plot_path is not None and result.plot_path.exists()


def test_sweep_that_applies_to_no_method_fails_before_decoding(tmp_path, tiny_data):
    scripted = Scripted({})
    with pytest.raises(ProxyAlignError, match="applies to none"):
        run_eval(scripted, _config(tmp_path, tiny_data, methods=["base"], sweeps=["margin=0,0.1"]))
    with pytest.raises(ProxyAlignError):
        run_eval(scripted, _config(tmp_path, tiny_data, methods=["confidence_bet"], sweeps=["margin=0,3"]))
    assert scripted.calls == []


def test_method_roles_choose_the_stop_strings():
    assert resolve_method("base").roles == ("base",)
    assert resolve_method("aligned").roles == ("aligned",)
    assert Method("confidence_bet", (("margin", 0.2),)).roles == ("base", "aligned")


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


def test_cli_eval_runs_resumes_and_rebuilds_the_report(tiny_dirs, tmp_path, tiny_data, capsys):
    out = tmp_path / "cli"
    args = [
        "eval", "--base", tiny_dirs[0], "--aligned", tiny_dirs[1], "--device", "cpu",
        "--datasets", f"tiny={tiny_data}", "--methods", "base,aligned", "--criterion", "dual_kad",
        "--param", "threshold=0.3", "--limit", "2", "--batch-size", "2", "--max-new-tokens", "3",
        "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dual_kad[threshold=0.3]" in printed and "report:" in printed
    assert len(_lines(out)) == 6
    assert main(args) == 0  # resumes: nothing new
    assert len(_lines(out)) == 6
    assert main(["eval", "--report-only", str(out)]) == 0
    assert "| p alone (`base`) | 2 |" in (out / "report.md").read_text()


def test_cli_eval_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--datasets", "gsm8k"]) == 2
    assert "needs --base and --aligned" in capsys.readouterr().err
    args = ["eval", "--base", "x", "--aligned", "y", "--methods", "confidence_bet[margin=9]"]
    assert main(args) == 2
    assert "margin" in capsys.readouterr().err


def test_speculative_mode_reports_draft_acceptance_instead_of_rejection_rate(aligner, tmp_path, tiny_data):
    config = _config(tmp_path, tiny_data, methods=["confidence_bet"], limit=2, mode="speculative", gamma=2)
    result = run_eval(aligner, config)
    (summary,) = result.summaries
    assert summary.modes == ("speculative",) and summary.n == 2
    assert summary.rejection_rate is None and summary.acceptance_rate is not None
    assert "spec. accept" in result.report_path.read_text()
