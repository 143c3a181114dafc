"""``ProxyAligner``: the public face of the engine.

It owns the loaded models (p, q*, and optionally the small base q), their shared tokenizer, per-model
prompt formats and default generation settings, and turns ``generate`` / ``stream`` calls into runs of
the decoding loop. Calls are serialised by a lock: the models are shared, and two decodes must never
interleave in one cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict, Unpack

import torch

from proxyalign.criteria.base import Criterion
from proxyalign.engine.loop import Decoder, run_loop
from proxyalign.engine.results import Generation, GenerationChunk
from proxyalign.engine.runner import ModelRunner, left_pad
from proxyalign.engine.sampling import SamplingConfig
from proxyalign.engine.speculative import GammaSchedule, SpeculativeDecoder
from proxyalign.engine.token_level import TokenLevelDecoder
from proxyalign.errors import InvalidParameterError
from proxyalign.models import (
    LoadedModel,
    check_same_vocabulary,
    context_window,
    eos_token_ids,
    load_model,
    model_device,
)
from proxyalign.plugins import get_criterion
from proxyalign.prompts import ROLES, Prompt, is_messages, prompt_for_role, tokenize_prompt, validate_format

__all__ = ["MODES", "GenerateOptions", "GenerationConfig", "ProxyAligner"]

PerRole = Any  # a value, or a mapping from role ("base", "aligned", "small_base") to values
#: Decoding modes: "token" runs the hybrid token by token (lazy q* where the criterion allows it);
#: "speculative" lets q* draft ``gamma`` tokens that p checks in one forward (same distribution);
#: "sss" is speculative decoding of the ``implicit_reward`` target p q*/q (exact reward-shifted
#: speculative sampling) and "sss_literal" the SSS paper's unnormalised rule (approximate).
MODES: tuple[str, ...] = ("token", "speculative", "sss", "sss_literal")
SSS_MODES: tuple[str, ...] = ("sss", "sss_literal")
#: The criterion whose target the SSS modes sample (a call in an SSS mode that names none gets it).
SSS_CRITERION = "implicit_reward"


class GenerateOptions(TypedDict, total=False):
    """Per-call options of ``generate`` / ``stream`` (all optional; None keeps the default)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    criterion: str | Criterion | None
    criterion_params: Mapping[str, Any] | None
    criterion_on: str
    mode: str
    gamma: int | str


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults of a :class:`ProxyAligner`; every field can be overridden per call."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    criterion_on: str = "scaled"
    seed: int | None = None
    stop: tuple[str, ...] = ()
    mode: str = "token"
    gamma: int | str = 4  #: speculative modes: drafts per round, or "adaptive"


def _per_role(value: PerRole, role: str, default: Any = None) -> Any:
    if isinstance(value, Mapping):
        unknown = set(value) - set(ROLES)
        if unknown:
            raise InvalidParameterError(
                f"unknown model role(s) {sorted(unknown)}; accepted: {', '.join(ROLES)}"
            )
        return value.get(role, default)
    return value if value is not None else default


class ProxyAligner:
    """Hybrid decoder of a large base model p and a small aligned model q*.

    >>> pa = ProxyAligner.from_pretrained(base="Qwen/Qwen2.5-7B", aligned="Qwen/Qwen2.5-0.5B-Instruct",
    ...                                   criterion="confidence_bet", criterion_params={"margin": 0.2})
    >>> pa.generate("Q: 2+2=? A:", max_new_tokens=8, seed=0)[0].text  # doctest: +SKIP
    """

    def __init__(
        self,
        base: Any,
        aligned: Any,
        tokenizer: Any,
        *,
        small_base: Any | None = None,
        criterion: str | Criterion = "confidence_bet",
        criterion_params: Mapping[str, Any] | None = None,
        prompt_formats: Mapping[str, str] | None = None,
        generation_config: GenerationConfig | None = None,
        names: Mapping[str, str] | None = None,
        tokenizers: Mapping[str, Any] | None = None,
    ) -> None:
        """Wrap already loaded models (e.g. tiny ones built from a config in tests).

        ``tokenizers`` may give each model its own tokenizer object; they must share one vocabulary.
        """
        self.models: dict[str, Any] = {"base": base, "aligned": aligned}
        if small_base is not None:
            self.models["small_base"] = small_base
        self.tokenizer = tokenizer
        per_model_tokenizers = {role: (tokenizers or {}).get(role, tokenizer) for role in self.models}
        self.vocab_size = check_same_vocabulary(per_model_tokenizers)
        for role, model in self.models.items():
            width = model.get_output_embeddings().weight.shape[0]
            if width < self.vocab_size:
                raise InvalidParameterError(
                    f"the {role} model predicts {width} ids but the tokenizer has {self.vocab_size}"
                )
        self.eos_token_ids = eos_token_ids(self.models, per_model_tokenizers)
        self.pad_token_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else min(self.eos_token_ids, default=0)
        )
        formats = dict(prompt_formats or {})
        self.prompt_formats = {role: validate_format(role, formats.get(role, "auto")) for role in ROLES}
        self.names = {
            role: (names or {}).get(role, type(model).__name__) for role, model in self.models.items()
        }
        self.defaults = generation_config or GenerationConfig()
        self.criterion = get_criterion(criterion, **dict(criterion_params or {}))
        self._check_criterion(self.criterion)
        self._lock = threading.RLock()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str],
        aligned: str | os.PathLike[str],
        *,
        small_base: str | os.PathLike[str] | None = None,
        criterion: str | Criterion = "confidence_bet",
        criterion_params: Mapping[str, Any] | None = None,
        dtype: PerRole = "auto",
        device: PerRole = None,
        device_map: PerRole = None,
        trust_remote_code: bool = False,
        prompt_formats: Mapping[str, str] | None = None,
        generation_config: GenerationConfig | None = None,
    ) -> ProxyAligner:
        """Load p, q* (and q) from hub ids, local directories, ``.gguf`` files or offline assets.

        ``dtype``, ``device`` and ``device_map`` take one value for all models or a mapping per role,
        e.g. ``device={"base": "cuda:0", "aligned": "cuda:1"}``.
        """
        # Validate the criterion before spending a minute loading weights.
        chosen = get_criterion(criterion, **dict(criterion_params or {}))
        if chosen.needs_small_base and small_base is None:
            raise InvalidParameterError(
                f"criterion {chosen.name!r} needs the small base model q: pass small_base=..."
            )
        specs = {"base": base, "aligned": aligned}
        if small_base is not None:
            specs["small_base"] = small_base
        loaded: dict[str, LoadedModel] = {}
        for role, spec in specs.items():
            loaded[role] = load_model(
                spec,
                role=role,
                dtype=_per_role(dtype, role, "auto"),
                device=_per_role(device, role),
                device_map=_per_role(device_map, role),
                trust_remote_code=trust_remote_code,
            )
        return cls(
            loaded["base"].model,
            loaded["aligned"].model,
            loaded["aligned"].tokenizer,
            small_base=loaded["small_base"].model if "small_base" in loaded else None,
            criterion=chosen,
            prompt_formats=prompt_formats,
            generation_config=generation_config,
            names={role: item.name for role, item in loaded.items()},
            tokenizers={role: item.tokenizer for role, item in loaded.items()},
        )

    # -- settings ------------------------------------------------------------------------------
    def _check_criterion(self, criterion: Criterion) -> None:
        if criterion.needs_small_base and "small_base" not in self.models:
            raise InvalidParameterError(
                f"criterion {criterion.name!r} needs the small base model q, but this ProxyAligner "
                "has none: load it with small_base=..."
            )

    def resolve_criterion(
        self,
        criterion: str | Criterion | None = None,
        criterion_params: Mapping[str, Any] | None = None,
        mode: str | None = None,
    ) -> Criterion:
        """The criterion of a call: the instance default unless a name/params are given.

        A call in an SSS mode (``mode``, else the instance's) that names no criterion gets
        ``implicit_reward``: those modes sample its target, so naming it as well would be redundant.
        """
        sss = (mode or self.defaults.mode) in SSS_MODES
        if criterion is None and sss and self.criterion.name != SSS_CRITERION:
            criterion = SSS_CRITERION
        if criterion is None and not criterion_params:
            return self.criterion
        if criterion is None:
            chosen = get_criterion(self.criterion.name, **{**self.criterion.params, **criterion_params})
        else:
            chosen = get_criterion(criterion, **dict(criterion_params or {}))
        self._check_criterion(chosen)
        return chosen

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> list[Generation]:
        """Complete a prompt or a batch of prompts; one :class:`Generation` per prompt, in order.

        ``options`` override the instance defaults for this call: ``max_new_tokens``, ``temperature``
        (0 = greedy), ``top_k``, ``top_p``, ``seed``, ``stop``, ``criterion``, ``criterion_params``,
        ``criterion_on``, ``mode`` and ``gamma`` (see :data:`MODES`).
        """
        batch = self._as_batch(prompts)
        results: list[Generation | None] = [None] * len(batch)
        for chunk in self._chunks(batch, options):
            if chunk.generation is not None:
                results[chunk.index] = chunk.generation
        return [r for r in results if r is not None]

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[GenerationChunk]:
        """Stream one prompt's completion; the last chunk carries the whole :class:`Generation`."""
        if self._looks_like_batch(prompt):
            raise InvalidParameterError("stream() takes one prompt; use stream_batch() for several")
        yield from self._chunks([prompt], options)

    def stream_batch(
        self, prompts: Sequence[Prompt], **options: Unpack[GenerateOptions]
    ) -> Iterator[GenerationChunk]:
        """Stream several prompts decoded as one batch; chunks say which prompt by ``index``."""
        yield from self._chunks(self._as_batch(prompts), options)

    # -- internals -----------------------------------------------------------------------------
    @staticmethod
    def _looks_like_batch(prompts: Any) -> bool:
        return isinstance(prompts, Sequence) and not isinstance(prompts, str) and not is_messages(prompts)

    def _as_batch(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        batch = list(prompts) if self._looks_like_batch(prompts) else [prompts]
        if not batch:
            raise InvalidParameterError("prompts is empty; give at least one prompt")
        return batch

    def _settings(self, options: Mapping[str, Any]) -> tuple[GenerationConfig, SamplingConfig]:
        """Merge per-call options into the defaults and validate them all before any work."""
        unknown = set(options) - set(GenerateOptions.__annotations__)
        if unknown:
            accepted = ", ".join(GenerateOptions.__annotations__)
            raise InvalidParameterError(
                f"unknown generation option(s) {sorted(unknown)}; accepted: {accepted}"
            )
        overrides = {
            key: value
            for key, value in options.items()
            if value is not None and key in GenerationConfig.__dataclass_fields__
        }
        if isinstance(overrides.get("stop"), str):
            overrides["stop"] = (overrides["stop"],)
        elif "stop" in overrides:
            overrides["stop"] = tuple(overrides["stop"])
        config = replace(self.defaults, **overrides)
        n = config.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if not all(isinstance(s, str) for s in config.stop):
            raise InvalidParameterError(f"stop must be a string or a list of strings, got {config.stop!r}")
        if config.mode not in MODES:
            raise InvalidParameterError(f"mode must be one of {', '.join(MODES)}; got {config.mode!r}")
        sampling = SamplingConfig(config.temperature, config.top_k, config.top_p, config.criterion_on)
        return config, sampling

    def _active_roles(self, criterion: Criterion) -> list[str]:
        roles = ["aligned"] if criterion.always_rejects else ["base", "aligned"]
        if criterion.needs_small_base:
            roles.append("small_base")
        return roles

    def _tokenize(
        self, batch: list[Prompt], roles: list[str], max_new_tokens: int
    ) -> dict[str, list[list[int]]]:
        encoded: dict[str, list[list[int]]] = {}
        for role in roles:
            fmt = self.prompt_formats[role]
            window = context_window(self.models[role])
            rows = []
            for index, prompt in enumerate(batch):
                ids = tokenize_prompt(prompt_for_role(prompt, role, index), fmt, self.tokenizer, index)
                if window is not None and len(ids) + max_new_tokens > window:
                    raise InvalidParameterError(
                        f"prompt {index} has {len(ids)} tokens for the {role} model; with "
                        f"max_new_tokens={max_new_tokens} that exceeds its context window of {window}"
                    )
                rows.append(ids)
            encoded[role] = rows
        return encoded

    def _generator(self, seed: int | None, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        return generator

    def _chunks(self, batch: list[Prompt], options: Mapping[str, Any]) -> Iterator[GenerationChunk]:
        config, sampling = self._settings(options)
        chosen = self.resolve_criterion(
            options.get("criterion"), options.get("criterion_params"), config.mode
        )
        roles = self._active_roles(chosen)
        encoded = self._tokenize(batch, roles, config.max_new_tokens)
        with self._lock:
            runners = {}
            for role in roles:
                device = model_device(self.models[role])
                ids, mask = left_pad(encoded[role], self.pad_token_id, device)
                runners[role] = ModelRunner(self.models[role], ids, mask)
            lead = runners["base" if "base" in runners else "aligned"]
            generator = self._generator(config.seed, lead.device)
            decoder = self._make_decoder(config, runners, chosen, sampling, generator)
            prompt_tokens = [len(ids) for ids in encoded[roles[0]]]
            yield from run_loop(
                decoder, self.tokenizer, prompt_tokens, config.max_new_tokens, self.eos_token_ids, config.stop
            )

    def _make_decoder(
        self,
        config: GenerationConfig,
        runners: dict[str, ModelRunner],
        criterion: Criterion,
        sampling: SamplingConfig,
        generator: torch.Generator,
    ) -> Decoder:
        """The decoding mode of a call (``config.mode``); every mode samples the same distribution.

        Speculative modes fall back to token level for a criterion that always rejects (q* alone:
        nothing for p to check). "sss"/"sss_literal" decode the ``implicit_reward`` target and say so
        when the call's criterion is another one.
        """
        gamma = GammaSchedule.parse(config.gamma)
        if config.mode == "token" or (config.mode == "speculative" and criterion.always_rejects):
            return TokenLevelDecoder(runners, criterion, sampling, self.vocab_size, generator)
        if config.mode in SSS_MODES and criterion.name != SSS_CRITERION:
            raise InvalidParameterError(
                f"mode {config.mode!r} samples SSS's target p*q*/q, which is the 'implicit_reward' "
                f"criterion; this call uses {criterion.name!r}: pass criterion='implicit_reward' "
                "(it needs the small base model, small_base=...)"
            )
        if config.mode in MODES:
            rule = "sss_literal" if config.mode == "sss_literal" else "exact"
            return SpeculativeDecoder(
                runners,
                criterion,
                sampling,
                self.vocab_size,
                generator,
                gamma=gamma,
                max_new_tokens=config.max_new_tokens,
                rule=rule,
            )
        raise InvalidParameterError(f"mode must be one of {', '.join(MODES)}; got {config.mode!r}")

    def __repr__(self) -> str:
        models = ", ".join(f"{role}={name!r}" for role, name in self.names.items())
        return f"ProxyAligner({models}, criterion={self.criterion!r})"
