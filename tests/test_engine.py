"""The whole engine on tiny random models: exact distributions, HF parity, lazy = eager, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import proxyalign
from proxyalign.engine.sampling import logits_to_probs
from proxyalign.testing import tiny_aligner, tiny_model, tiny_tokenizer
from tests.stats import ALPHA, assert_matches, histogram, two_sample_pvalue

PROMPT = "w5 w6 w7"
N = 4000


def first_token_target(pa, criterion, prompt=PROMPT, temperature=1.0, top_k=None, top_p=None, raw=False):
    """pi of the first generated token, from each model's own logits (independent of the engine)."""
    ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
    dists, views = {}, {}
    for role, model in pa.models.items():
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        proposer = role != "small_base"
        dists[role] = logits_to_probs(
            logits, pa.vocab_size, temperature, top_k if proposer else None, top_p if proposer else None
        )
        views[role] = logits_to_probs(logits, pa.vocab_size) if raw else dists[role]
    if raw:
        mu = criterion.rejection(views["base"], views["aligned"], views.get("small_base"))
        s = (dists["base"] * mu).sum(-1, keepdim=True)
        return (dists["base"] * (1 - mu) + dists["aligned"] * s)[0]
    return criterion.target(dists["base"], dists["aligned"], dists.get("small_base"))[0]


CASES = [
    ("base", {}),
    ("aligned", {}),
    ("nudging", {"threshold": 0.3}),
    ("dual_kad", {"threshold": 0.1}),
    ("primal_kad", {"alpha": 0.3}),
    ("confidence_bet", {"margin": 0.1}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_first_token_histogram_matches_target(aligner, name, params):
    criterion = proxyalign.get_criterion(name, **params)
    gens = aligner.generate([PROMPT] * N, max_new_tokens=1, temperature=0.8, seed=1, criterion=criterion)
    tokens = torch.tensor([g.token_ids[0] for g in gens])
    assert_matches(tokens, first_token_target(aligner, criterion, temperature=0.8), name)


def test_implicit_reward_first_token_matches_target(aligner_with_q):
    criterion = proxyalign.get_criterion("implicit_reward")
    gens = aligner_with_q.generate([PROMPT] * N, max_new_tokens=1, seed=2)
    tokens = torch.tensor([g.token_ids[0] for g in gens])
    assert_matches(tokens, first_token_target(aligner_with_q, criterion), "implicit_reward")
    stats = gens[0].stats
    assert stats.pgm_checks == 1 and stats.pgm_condition_rate is not None


def test_top_k_top_p_and_raw_criterion_view(aligner):
    criterion = proxyalign.get_criterion("confidence_bet", margin=0.05)
    for raw in (False, True):
        gens = aligner.generate(
            [PROMPT] * N,
            max_new_tokens=1,
            temperature=0.7,
            top_k=20,
            top_p=0.9,
            seed=3,
            criterion=criterion,
            criterion_on="raw" if raw else "scaled",
        )
        tokens = torch.tensor([g.token_ids[0] for g in gens])
        target = first_token_target(aligner, criterion, temperature=0.7, top_k=20, top_p=0.9, raw=raw)
        assert_matches(tokens, target, f"criterion_on={'raw' if raw else 'scaled'}")


def test_padded_vocabulary_rows_get_no_mass():
    pa = proxyalign.ProxyAligner(
        tiny_model(0, vocab_size=80, scale=0.2),
        tiny_model(1, layers=1, vocab_size=96, scale=0.2),
        tiny_tokenizer(),
        criterion="confidence_bet",
    )
    assert pa.vocab_size == 64
    gens = pa.generate([PROMPT] * 2000, max_new_tokens=2, seed=4)
    assert max(t for g in gens for t in g.token_ids) < 64


def hf_greedy(model, prompt, n):
    ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=1, pad_token_id=2)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize(("name", "role"), [("base", "base"), ("aligned", "aligned")])
def test_greedy_endpoints_equal_hf_generate(aligner, name, role):
    for prompt in (PROMPT, "w9", "w20 w21 w22 w23 w24"):
        ours = aligner.generate(prompt, max_new_tokens=20, temperature=0, criterion=name)[0]
        assert ours.token_ids == hf_greedy(aligner.models[role], prompt, 20)[: len(ours.token_ids)]


def test_batched_and_one_by_one_greedy_agree(aligner):
    prompts = ["w5", "w6 w7 w8 w9 w10 w11", "w12 w13", "<user> w14 </s> <assistant>"]
    for name in ("dual_kad", "confidence_bet", "nudging"):
        batched = aligner.generate(prompts, max_new_tokens=12, temperature=0, criterion=name)
        single = [aligner.generate(p, max_new_tokens=12, temperature=0, criterion=name)[0] for p in prompts]
        assert [g.token_ids for g in batched] == [g.token_ids for g in single], name
        assert [g.sources for g in batched] == [g.sources for g in single], name


def test_finished_rows_leave_the_batch_and_the_others_decode_unchanged(aligner, monkeypatch):
    """Rows ending at different steps (stop strings, EOS, their own limit) drop out of every model's
    batch; the rows still decoding get exactly the tokens they get alone."""
    from proxyalign.engine.lanes import Lane

    sizes: list[int] = []
    retain = Lane.retain

    def recording_retain(self, rows):
        sizes.append(len(rows))
        retain(self, rows)

    monkeypatch.setattr(Lane, "retain", recording_retain)
    prompts = ["w5", "w6 w7 w8 w9 w10 w11", "w12 w13", "<user> w14 </s> <assistant>", "w30 w31"]
    for name in ("base", "dual_kad", "confidence_bet"):
        single = [aligner.generate(p, max_new_tokens=16, temperature=0, criterion=name)[0] for p in prompts]
        # a stop string taken from each row's own output, at a different depth per row
        stops = [" ".join(g.text.split()[i + 1 : i + 2]) for i, g in enumerate(single)]
        stops = [s for s in stops if s]
        sizes.clear()
        options = {"max_new_tokens": 16, "temperature": 0, "criterion": name, "stop": stops}
        batched = aligner.generate(prompts, **options)
        alone = [aligner.generate(p, **options)[0] for p in prompts]
        assert [g.token_ids for g in batched] == [g.token_ids for g in alone], name
        assert [g.sources for g in batched] == [g.sources for g in alone], name
        assert len({len(g.token_ids) for g in batched}) > 1, "rows should end at different steps"
        assert sizes and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts), sizes


class EagerDualKad(proxyalign.Criterion):
    """dual_kad declared as reading q* too, which forces the eager path: same mu, same distribution."""

    name = "eager_dual_kad"
    params = (proxyalign.Param("threshold", 0.1, "as dual_kad"),)
    reads = frozenset({"p", "q_star"})

    def rejection(self, p, q_star=None, q=None):
        return (p < self.params["threshold"]).to(p.dtype)


def test_lazy_and_eager_agree_in_distribution_and_lazy_saves_q_star_calls(aligner):
    lazy = proxyalign.get_criterion("dual_kad", threshold=0.1)
    eager = EagerDualKad(threshold=0.1)
    n = 3000
    results = {}
    for label, criterion in (("lazy", lazy), ("eager", eager)):
        gens = aligner.generate([PROMPT] * n, max_new_tokens=2, temperature=0.8, seed=5, criterion=criterion)
        pairs = torch.tensor([g.token_ids[0] * 64 + g.token_ids[1] for g in gens if len(g.token_ids) == 2])
        results[label] = (histogram(pairs, 64 * 64), gens[0].stats)
    assert two_sample_pvalue(results["lazy"][0], results["eager"][0]) > ALPHA
    single_lazy = aligner.generate(
        PROMPT,
        max_new_tokens=30,
        temperature=0.8,
        seed=6,
        criterion="dual_kad",
        criterion_params={"threshold": 0.02},
    )[0]
    stats = single_lazy.stats
    assert stats.aligned_forwards <= stats.rejected_drafts < stats.base_forwards


def test_stats_and_provenance_are_consistent(aligner):
    for name in ("dual_kad", "confidence_bet", "nudging", "primal_kad", "base", "aligned"):
        for g in aligner.generate([PROMPT, "w9 w10"], max_new_tokens=25, seed=7, criterion=name):
            s = g.stats
            assert len(g.token_ids) == len(g.sources) == s.new_tokens
            assert s.tokens_from_base == g.sources.count(proxyalign.Source.BASE)
            assert s.tokens_from_aligned == g.sources.count(proxyalign.Source.ALIGNED)
            assert s.tokens_from_base + s.tokens_from_aligned == s.new_tokens
            assert s.rejected_drafts == s.tokens_from_aligned
            if name == "base":
                assert s.rejection_rate == 0.0 and s.aligned_forwards == 0
            if name == "aligned":
                assert s.rejection_rate == 1.0 and s.base_forwards == 0


def test_seeded_runs_reproduce(aligner):
    a = aligner.generate([PROMPT, "w9"], max_new_tokens=15, seed=11, criterion="confidence_bet")
    b = aligner.generate([PROMPT, "w9"], max_new_tokens=15, seed=11, criterion="confidence_bet")
    c = aligner.generate([PROMPT, "w9"], max_new_tokens=15, seed=12, criterion="confidence_bet")
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_eos_ends_a_row_and_is_reported(aligner):
    gens = aligner.generate([PROMPT] * 64, max_new_tokens=40, seed=13, criterion="aligned")
    ended = [g for g in gens if g.finish_reason == proxyalign.FinishReason.EOS]
    assert ended, "expected some rows to draw EOS"
    for g in ended:
        assert g.token_ids[-1] == 1 and 1 not in g.token_ids[:-1] and "</s>" not in g.text
    for g in gens:
        if g.finish_reason == proxyalign.FinishReason.LENGTH:
            assert len(g.token_ids) == 40


def test_multi_token_stop_strings_are_cut_also_while_streaming(aligner):
    full = aligner.generate(PROMPT, max_new_tokens=20, temperature=0, criterion="base")[0]
    words = full.text.split()
    assert len(words) > 6
    stop = f"{words[3]} {words[4]}"  # spans two tokens
    expected = full.text[: full.text.index(stop)]
    cut = aligner.generate(PROMPT, max_new_tokens=20, temperature=0, criterion="base", stop=[stop, "zzz"])[0]
    assert cut.text == expected
    assert cut.finish_reason == proxyalign.FinishReason.STOP and cut.stop_sequence == stop
    pieces, final = [], None
    for chunk in aligner.stream(PROMPT, max_new_tokens=20, temperature=0, criterion="base", stop=stop):
        pieces.append(chunk.text)
        assert stop not in "".join(pieces)
        final = chunk.generation or final
    assert "".join(pieces) == expected == final.text


def test_streaming_concatenates_to_the_generated_text(aligner):
    chunks = list(aligner.stream(PROMPT, max_new_tokens=15, seed=3, criterion="confidence_bet"))
    final = chunks[-1].generation
    assert final is not None and chunks[-1].finish_reason is not None
    assert "".join(c.text for c in chunks) == final.text
    assert [t for c in chunks for t in c.token_ids] == final.token_ids
    direct = aligner.generate(PROMPT, max_new_tokens=15, seed=3, criterion="confidence_bet")[0]
    assert direct.token_ids == final.token_ids


def test_stream_batch_reports_rows_by_index(aligner):
    chunks = list(aligner.stream_batch([PROMPT, "w9"], max_new_tokens=5, seed=1))
    assert {c.index for c in chunks} == {0, 1}
    assert sum(c.generation is not None for c in chunks) == 2


def test_per_model_prompts_and_formats():
    pa = tiny_aligner("confidence_bet", prompt_formats={"base": "plain", "aligned": "chat"})
    prompt = {"base": "Q: w5 w6 A:", "aligned": "w5 w6"}
    g = pa.generate(prompt, max_new_tokens=4, seed=0)[0]
    assert g.stats.prompt_tokens == 4  # p's prompt, plain
    chat = [{"role": "user", "content": "w5 w6"}]
    rendered = tiny_tokenizer().apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert len(tiny_tokenizer()(rendered)["input_ids"]) > 2
    assert pa.generate(chat, max_new_tokens=3, seed=0)[0].stats.new_tokens == 3


def test_greedy_target_criterion_is_argmax_of_target(aligner_with_q):
    g = aligner_with_q.generate(PROMPT, max_new_tokens=1, temperature=0)[0]
    target = first_token_target(aligner_with_q, proxyalign.get_criterion("implicit_reward"))
    assert g.token_ids[0] == int(np.argmax(target.numpy()))


@pytest.mark.parametrize("temperature", [1e-38, 1e-6])
def test_a_vanishing_temperature_decodes_greedily(aligner, temperature):
    greedy = aligner.generate(PROMPT, max_new_tokens=12, temperature=0, criterion="confidence_bet")[0]
    tiny = aligner.generate(PROMPT, max_new_tokens=12, temperature=temperature, criterion="confidence_bet")[0]
    assert tiny.token_ids == greedy.token_ids and tiny.sources == greedy.sources
