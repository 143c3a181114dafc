"""The live progress line: the engine's running token count, and the line drawn while a decode blocks."""

from __future__ import annotations

import time

from proxyalign.progress import DecodeProgress, decoded_tokens


def test_the_engine_counts_tokens_as_they_are_decoded(aligner):
    before = decoded_tokens(aligner)
    generations = aligner.generate(["w5 w6", "w7"], max_new_tokens=5, seed=0)
    assert decoded_tokens(aligner) - before == sum(len(g.token_ids) for g in generations)


class Slow:
    """An aligner whose decode takes a while: what the line is for (a real engine behind it)."""

    def __init__(self, inner):
        self.inner = inner

    def status(self):
        return self.inner.status()

    def generate(self, prompts, **options):
        out = []
        for prompt in prompts:
            out += self.inner.generate([prompt], **options)
            time.sleep(0.15)
        return out


def test_a_blocking_decode_shows_rows_tokens_and_speed_on_stderr(aligner, capsys):
    slow = Slow(aligner)
    with DecodeProgress(slow, rows=3, desc="p alone", interval_s=0.05):
        generations = slow.generate(["w5 w6", "w7", "w8 w9"], max_new_tokens=4, seed=1)
    err = capsys.readouterr().err
    assert "p alone" in err and "tok/s" in err and "/3" in err
    tokens = sum(len(g.token_ids) for g in generations)
    assert f"{tokens} tokens" in err, err[-400:]


def test_no_line_without_a_status_or_when_disabled(aligner, capsys):
    with DecodeProgress(object(), rows=2, desc="x", interval_s=0.01):
        time.sleep(0.05)
    with DecodeProgress(aligner, rows=2, desc="y", interval_s=0.01, enabled=False):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""
