"""Worker methods for ``LLM.collective_rpc``: reconfigure the hybrid in every tensor-parallel rank."""

from __future__ import annotations

from typing import Any

__all__ = ["HybridWorkerExtension"]


class HybridWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); ``self`` is the worker."""

    def _proxyalign_model(self) -> Any:
        from proxyalign_vllm.model import ProxyAlignHybrid

        root = self.get_model()  # type: ignore[attr-defined]
        for module in root.modules():
            if isinstance(module, ProxyAlignHybrid):
                return module
        raise RuntimeError("this vLLM engine does not run the proxyalign hybrid")

    def proxyalign_set_criterion(self, name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Switch the criterion from the next step on; returns its validated parameters."""
        return self._proxyalign_model().set_criterion(name, params)

    def proxyalign_describe(self) -> str:
        return self._proxyalign_model().describe()
