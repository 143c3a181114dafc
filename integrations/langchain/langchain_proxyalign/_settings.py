"""Fields and helpers shared by :class:`ProxyAlignLLM` and :class:`ChatProxyAlign`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxyalign import ProxyAligner, adapters
from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Call kwargs LangChain itself consumes before (or while) calling us.
IGNORED_CALL_KWARGS = frozenset({"stream"})
#: Settings with a field of their own (``max_tokens`` is the engine's ``max_new_tokens``).
_FIELDS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "seed",
        "stop",
        "criterion",
        "criterion_params",
        "criterion_on",
    }
)


class ProxyAlignSettings(BaseModel):
    """Which models, which criterion, which sampling settings.

    Either ``aligner`` (a loaded :class:`proxyalign.ProxyAligner`, shared by any number of adapters)
    or ``base`` and ``aligned`` (model ids, directories or offline asset names; loaded once per process)
    must be given. Sampling fields left at ``None`` fall back to the aligner's defaults.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    aligner: Any = Field(default=None, exclude=True, description="A loaded ProxyAligner to share.")
    base: str | None = Field(default=None, description="Large base model p (id, directory or asset).")
    aligned: str | None = Field(default=None, description="Small aligned model q* (id, directory or asset).")
    small_base: str | None = Field(default=None, description="Small base model q, for criteria needing it.")
    load_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More ProxyAligner.from_pretrained arguments: dtype, device, device_map, prompt_formats",
    )
    criterion: Any = Field(default=None, description="Criterion name or object; None: the aligner's.")
    criterion_params: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, description="Maximum new tokens (engine: max_new_tokens).")
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    criterion_on: str | None = None
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further ProxyAligner.generate options, e.g. a decoding mode."
    )
    streaming: bool = False

    @model_validator(mode="after")
    def _attach_aligner(self) -> ProxyAlignSettings:
        """Load (or reuse) the engine and validate settings at construction, not at the first call."""
        if self.aligner is None:
            if not (self.base and self.aligned):
                raise ValueError("give either aligner=ProxyAligner(...) or both base=... and aligned=...")
            if self.criterion is None:
                self.criterion = adapters.default_criterion()
            self.aligner = adapters.shared_aligner(
                self.base, self.aligned, self.small_base, self.criterion, self.load_kwargs
            )
        elif not isinstance(self.aligner, ProxyAligner):
            raise TypeError(f"aligner must be a proxyalign.ProxyAligner, got {type(self.aligner).__name__}")
        unknown = set(self.engine_kwargs) - (adapters.engine_parameters(self.aligner) - _FIELDS)
        if unknown:
            raise ValueError(
                f"engine_kwargs {sorted(unknown)} are not ProxyAligner.generate options without a field "
                f"of their own; accepted: {sorted(adapters.engine_parameters(self.aligner) - _FIELDS)}"
            )
        settings = {k: v for k, v in self._instance_settings().items() if v is not None}
        self.aligner.check_options(**settings)  # every setting now, not at the first call
        return self

    @property
    def model_name(self) -> str:
        """Both models, base first."""
        return adapters.model_name(self.aligner)

    def _instance_settings(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "criterion_on": self.criterion_on,
            **self.engine_kwargs,
            "criterion": self.criterion,
            "criterion_params": self.criterion_params,
        }

    def _identifying(self) -> dict[str, Any]:
        """Enough to tell two configurations apart: a LangChain cache key."""
        criterion = self.aligner.resolve_criterion(self.criterion, self.criterion_params)
        names = self.aligner.names
        settings = adapters.effective_settings(self.aligner, self._instance_settings())
        settings.pop("criterion", None)
        settings.pop("criterion_params", None)
        return {
            "model_name": self.model_name,
            "base": names.get("base"),
            "aligned": names.get("aligned"),
            "small_base": names.get("small_base"),
            "prompt_formats": dict(self.aligner.prompt_formats),
            "criterion": criterion.name,
            "criterion_params": dict(criterion.params),
            **settings,
        }

    def _ls_settings(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Temperature, max tokens and stop of a call, for LangSmith's standard trace fields."""
        settings = adapters.effective_settings(self.aligner, self._instance_settings())
        return {
            "ls_temperature": kwargs.get("temperature", settings["temperature"]),
            "ls_max_tokens": kwargs.get(
                "max_tokens", kwargs.get("max_new_tokens", settings["max_new_tokens"])
            ),
            "ls_stop": stop if stop is not None else settings["stop"],
        }

    def _engine_call(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> adapters.EngineCall:
        call = dict(kwargs)
        if stop is not None:
            call["stop"] = list(stop)
        return adapters.engine_call(
            self.aligner,
            self._instance_settings(),
            call,
            owner=type(self).__name__,
            ignored=IGNORED_CALL_KWARGS,
        )

    def get_token_ids(self, text: str) -> list[int]:
        """Our tokenizer's ids (LangChain's default downloads a GPT-2 tokenizer, or counts 0 offline)."""
        custom = getattr(self, "custom_get_token_ids", None)
        if custom is not None:
            return custom(text)
        return list(self.aligner.tokenizer.encode(text, add_special_tokens=False))


def combine_llm_outputs(outputs: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Sum token usage over the results of several prompts."""
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    name = None
    for output in outputs:
        if not output:
            continue
        name = output.get("model_name", name)
        for key, value in (output.get("token_usage") or {}).items():
            total[key] = total.get(key, 0) + value
    return {"token_usage": total, "model_name": name}
