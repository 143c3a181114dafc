"""``proxyalign serve``: the hybrid behind an OpenAI-compatible HTTP API.

Needs the ``serve`` extra (``pip install 'proxyalign[serve]'``: FastAPI, uvicorn, prometheus-client).
The core never imports this package; it is one more client of ``ProxyAligner``'s async API::

    from proxyalign.server import ServerConfig, create_app
    app = create_app(aligner, ServerConfig(api_key="KEY"))   # any ASGI server runs it; uvicorn by default
"""

from __future__ import annotations

from typing import Any

from proxyalign.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]


def create_app(aligner: Any, config: ServerConfig | None = None) -> Any:
    """The FastAPI app over ``aligner`` (see :func:`proxyalign.server.app.create_app`)."""
    from proxyalign.server.app import create_app as build

    return build(aligner, config)
