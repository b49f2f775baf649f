"""etcd's JSON gateway (grpc-gateway over the client port), as an async client.

Every call is a POST of JSON to /v3/...; 64-bit integers come back as strings,
keys and values as base64. An etcd error reply (`{"error": ..., "code": ...}`)
or a non-200 status raises EtcdError with etcd's own message.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp

from bus_schemas.errors import MendersError

MAX_REPLY = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 2.0


class EtcdError(MendersError, RuntimeError):
    """etcd answered with an error, or did not answer."""


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def as_int(value: Any) -> int:
    return int(value or 0)


async def _body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body up to MAX_REPLY (one read() may return only what has arrived)."""
    chunks, size = [], 0
    while size < MAX_REPLY and (chunk := await resp.content.read(MAX_REPLY - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class Gateway:
    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def call(self, url: str, path: str, body: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._http().post(f"{url}{path}", json=body or {},
                                         timeout=timeout) as resp:
                raw = await _body(resp)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EtcdError(f"{url}{path}: no answer: {type(exc).__name__}: {exc}") from None
        try:
            reply: dict[str, Any] = json.loads(raw or b"{}")
        except ValueError:
            raise EtcdError(f"{url}{path}: HTTP {status}: unreadable {raw[:200]!r}") from None
        if status != 200 or "error" in reply:
            message = reply.get("error") or reply.get("message") or f"HTTP {status}"
            raise EtcdError(f"{url}{path}: {message}")
        return reply

    async def get_text(self, url: str, path: str, timeout_s: float | None = None,
                       ) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._http().get(f"{url}{path}", timeout=timeout) as resp:
                return resp.status, (await _body(resp)).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EtcdError(f"{url}{path}: no answer: {type(exc).__name__}: {exc}") from None

    # --- maintenance -----------------------------------------------------------

    async def status(self, url: str, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.call(url, "/v3/maintenance/status", timeout_s=timeout_s)

    async def alarms(self, url: str) -> list[dict[str, Any]]:
        reply = await self.call(url, "/v3/maintenance/alarm", {"action": "GET"})
        return list(reply.get("alarms") or [])

    async def disarm(self, url: str, member_id: str, alarm: str) -> None:
        await self.call(url, "/v3/maintenance/alarm",
                        {"action": "DEACTIVATE", "memberID": member_id, "alarm": alarm})

    async def defragment(self, url: str, timeout_s: float) -> None:
        await self.call(url, "/v3/maintenance/defragment", timeout_s=timeout_s)

    async def transfer_leadership(self, leader_url: str, target_id: str) -> None:
        await self.call(leader_url, "/v3/maintenance/transfer-leadership",
                        {"targetID": target_id}, timeout_s=5.0)

    # --- kv --------------------------------------------------------------------

    async def put(self, url: str, key: str, value: bytes, timeout_s: float | None = None,
                  ) -> dict[str, Any]:
        return await self.call(url, "/v3/kv/put", {"key": b64(key), "value": b64(value)},
                               timeout_s=timeout_s)

    async def get(self, url: str, key: str, timeout_s: float | None = None) -> dict[str, Any]:
        return await self.call(url, "/v3/kv/range", {"key": b64(key)}, timeout_s=timeout_s)

    async def compact(self, url: str, revision: int, timeout_s: float) -> None:
        await self.call(url, "/v3/kv/compaction", {"revision": str(revision),
                                                   "physical": True}, timeout_s=timeout_s)

    # --- cluster ---------------------------------------------------------------

    async def members(self, url: str) -> list[dict[str, Any]]:
        reply = await self.call(url, "/v3/cluster/member/list")
        return list(reply.get("members") or [])

    async def member_remove(self, url: str, member_id: str) -> None:
        await self.call(url, "/v3/cluster/member/remove", {"ID": member_id}, timeout_s=5.0)

    async def member_add(self, url: str, peer_url: str) -> dict[str, Any]:
        return await self.call(url, "/v3/cluster/member/add", {"peerURLs": [peer_url]},
                               timeout_s=5.0)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
