"""``ServerConfig``: every limit and switch of ``proxyalign serve``, with safe defaults.

Kept apart from the app so the command line can validate its options (and refuse a mistake) before a
minute of loading weights, and so tests can build servers with small limits.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

__all__ = ["LOOPBACK_HOSTS", "ServerConfig"]

#: Hosts that only this machine can reach; binding anything else without an API key needs a flag.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ServerConfig(BaseModel):
    """Limits and switches of the HTTP server (``proxyalign serve`` flags map onto these fields).

    The defaults suit one machine serving a small pair: the body, the prompt, ``max_tokens``, ``n`` and
    the queue are all bounded, so no single request (or crowd of them) can exhaust memory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"  #: loopback only unless told otherwise
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = None  #: when set, every /v1 route and /metrics need ``Bearer KEY``
    model_name: str = Field("proxyalign", min_length=1)  #: the id clients pass as ``model``
    max_body_bytes: int = Field(1 << 20, ge=1024)  #: larger bodies get 413
    max_prompt_tokens: int = Field(8192, ge=1)  #: per prompt, per model
    max_tokens: int = Field(4096, ge=1)  #: the largest ``max_tokens`` a request may ask for
    default_max_tokens: int = Field(256, ge=1)  #: when a request names none
    max_n: int = Field(8, ge=1)  #: choices per prompt
    max_prompts: int = Field(16, ge=1)  #: prompts in one ``/v1/completions`` request
    max_stop: int = Field(16, ge=1)  #: stop strings per request
    max_waiting: int = Field(64, ge=0)  #: rows that may queue behind a full batch before 429
    retry_after_s: int = Field(1, ge=0)  #: the ``Retry-After`` of a 429 or 503
    drain_s: float = Field(30.0, ge=0)  #: on shutdown, how long running requests may finish
    ignore_unsupported: bool = False  #: ignore OpenAI parameters the hybrid cannot honour, instead of 400
    stream_provenance: bool = False  #: default of the ``provenance`` extension for streamed responses

    @field_validator("default_max_tokens")
    @classmethod
    def _default_within_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_tokens")
        if limit is not None and value > limit:
            raise ValueError(f"default_max_tokens ({value}) must not exceed max_tokens ({limit})")
        return value

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    def key_bytes(self) -> bytes | None:
        return None if self.api_key is None else self.api_key.get_secret_value().encode()
