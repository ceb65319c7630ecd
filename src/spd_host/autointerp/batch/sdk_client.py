"""What the two SDK-backed batch clients share: the provider's async SDK client (built by the
provider module, as for synchronous calls) and the mapping of SDK errors onto the provider
error taxonomy, so a batch call fails the way a synchronous one does."""

from __future__ import annotations

from typing import Any

from spd_host.autointerp.providers.sdk_errors import translate


class SdkBatchClient:
    """Holds ``_sdk`` (the SDK module), ``_client`` (its async client) and ``_model``."""

    provider: str

    def __init__(self, provider: str, model: str, sdk: Any, client: Any) -> None:
        self.provider = provider
        self._model = model
        self._sdk = sdk
        self._client = client

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except self._sdk.APIError as err:
            mapped = translate(err, self._sdk, self.provider)
            raise (mapped or err) from err

    async def aclose(self) -> None:
        await self._client.close()
