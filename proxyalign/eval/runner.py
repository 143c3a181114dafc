"""The decoding loop: every (question, method, seed) the record store lacks, through the running batch.

Every method sees the same questions, the same prompts and the same seeds: question ``i`` of a dataset
and split is decoded with the seed derived from ``(seed, dataset, split, id)`` whatever the method, and
each request has its own generator, so its tokens do not depend on what decodes beside it. Work runs
question-major (question 1 with every method, then question 2 …) through the engine's running batch,
``batch_size`` requests at a time: as one finishes, the next joins, so the batch stays full. Each
finished instance is appended to the :class:`~proxyalign.eval.store.RecordStore` at once, so a resumed
run gives the same results as an uninterrupted one, whatever the batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxyalign.eval.config import EvalConfig
from proxyalign.eval.data import Problem
from proxyalign.eval.extract import score
from proxyalign.eval.methods import Method
from proxyalign.eval.prompts import method_prompt
from proxyalign.eval.store import RecordStore, record_key
from proxyalign.progress import DecodeProgress

__all__ = ["SOURCE_LETTERS", "Job", "Runner", "provenance", "question_seed"]

SOURCE_LETTERS = {"base": "p", "aligned": "q", "target": "t", "residual": "r", "bonus": "+"}


def question_seed(seed: int, dataset: str, split: str, instance: str) -> int:
    """The seed of one question: the same for every method, different across questions, datasets and
    seeds. Each request has its own generator, so a question samples the same tokens whatever else is
    decoding beside it (and however a run was split, interrupted or resumed)."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{split}/{instance}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def provenance(sources: Sequence[Any]) -> str:
    """Run-length summary of where tokens came from: ``"p12 q1 p30"`` (p: base, q: aligned, t: target,
    r: speculative residual, +: speculative bonus)."""
    runs: list[list[Any]] = []
    for source in sources:
        letter = SOURCE_LETTERS.get(str(source), "?")
        if runs and runs[-1][0] == letter:
            runs[-1][1] += 1
        else:
            runs.append([letter, 1])
    return " ".join(f"{letter}{count}" for letter, count in runs)


@dataclass
class Job:
    """One method variant on one split of one dataset, with one seed."""

    dataset: str
    split: str
    method: Method
    seed: int
    sweep_param: str | None = None

    def key(self, problem: Problem) -> str:
        return record_key(self.dataset, self.split, self.method.label, self.seed, problem.id)


class Runner:
    """Decodes jobs on questions with one aligner and appends each finished instance to the store."""

    def __init__(self, aligner: Any, config: EvalConfig, store: RecordStore, models: dict[str, str]) -> None:
        self.aligner = aligner
        self.config = config
        self.store = store
        self.models = models
        self.new_instances = 0

    def run(self, jobs: Sequence[Job], problems: Sequence[Problem], desc: str) -> None:
        """Decode every (question, method) pair the store lacks, question-major, ``batch_size`` at a time
        in the engine's running batch: a finished question is replaced by the next one at once."""
        if not jobs or not problems:
            return
        todo = [(job, p) for p in problems for job in jobs if job.key(p) not in self.store]
        total = len(jobs) * len(problems)
        bar = _progress(total, total - len(todo), desc, self.config.progress)
        calls = (self._call(job, problem) for job, problem in todo)
        live = DecodeProgress(self.aligner, enabled=self.config.progress, bar=bar)  # moves between questions
        decoded = self.aligner.as_completed(calls, in_flight=self.config.batch_size)
        try:
            with live:
                for position, generation in decoded:
                    job, problem = todo[position]
                    self.store.append([self._record(job, problem, generation)])
                    self.new_instances += 1
                    live.label = job.method.label
                    bar.update(1)
        finally:
            bar.close()

    def _call(self, job: Job, problem: Problem) -> tuple[Any, dict[str, Any]]:
        config = self.config
        prompt, stops = method_prompt(problem, config.prompts, job.method.roles)
        return prompt, {
            "criterion": job.method.criterion,
            "criterion_params": job.method.param_dict,
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "criterion_on": config.criterion_on,
            "seed": question_seed(job.seed, job.dataset, job.split, problem.id),
            "stop": list(stops),
            "mode": config.mode,
            "gamma": config.gamma,
        }

    def _record(self, job: Job, problem: Problem, generation: Any) -> dict[str, Any]:
        extracted, correct = score(
            generation.text, problem.answer, problem.kind, problem.labels, problem.choices
        )
        counts: dict[str, int] = {}
        for source in generation.sources:
            counts[str(source)] = counts.get(str(source), 0) + 1
        return {
            "key": job.key(problem),
            "dataset": job.dataset,
            "split": job.split,
            "id": problem.id,
            "method": job.method.label,
            "criterion": job.method.criterion,
            "params": job.method.param_dict,
            "sweep_param": job.sweep_param,
            "seed": job.seed,
            "question_seed": question_seed(job.seed, job.dataset, job.split, problem.id),
            "mode": self.config.mode,
            "kind": problem.kind,
            "gold": problem.answer,
            "extracted": extracted,
            "correct": bool(correct),
            "output": generation.text,
            "finish_reason": str(generation.finish_reason),
            "sources": counts,
            "provenance": provenance(generation.sources),
            "stats": generation.stats.as_dict(),
            "models": self.models,
        }


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)
