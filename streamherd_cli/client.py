"""The orchestrator's REST API as plain method calls: the one place where httpx errors and
error bodies become ``errors.Refused`` / ``errors.Unreachable``.

``transport`` is the test seam (``httpx.MockTransport``); busy answers (429, 503) are
retried a few times, honouring ``Retry-After``.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final
from urllib.parse import quote

import httpx

from shared import limits
from streamherd_cli.errors import Refused, TooOld, Unreachable

API: Final = "/api/v1"
DEFAULT_URL: Final = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_BUSY_RETRIES: Final = 4
MAX_RETRY_AFTER_S: Final = 10.0
USER_AGENT: Final = "streamherd-cli"


def base_url(url: str) -> str:
    """``http://host:8000``, whether given with a trailing slash or the API path."""
    url = url.strip().rstrip("/")
    return url.removesuffix(API).rstrip("/")


def _error_of(response: httpx.Response) -> Refused:
    try:
        body = response.json()
        error = body["error"]
        return Refused(
            str(error["code"]),
            str(error.get("message", "")),
            status=response.status_code,
            details=error.get("details") if isinstance(error.get("details"), dict) else None,
        )
    except (ValueError, KeyError, TypeError):
        reason = response.reason_phrase or "error"
        return Refused(f"HTTP_{response.status_code}", reason, status=response.status_code)


class Client:
    """One orchestrator, one admin token; every method returns the decoded JSON answer."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        busy_retries: int = DEFAULT_BUSY_RETRIES,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.url = base_url(url)
        self._token = token
        self._busy_retries = busy_retries
        self._sleep = sleep
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        api: bool = True,
    ) -> Any:
        target = f"{API}{path}" if api else path
        attempt = 0
        while True:
            try:
                response = self._http.request(method, target, json=json, params=params)
            except httpx.TimeoutException as exc:
                raise Unreachable(f"the orchestrator at {self.url} did not answer in time") from exc
            except (httpx.TransportError, httpx.InvalidURL, ValueError) as exc:
                raise Unreachable(f"cannot reach the orchestrator at {self.url}: {exc}") from exc
            if response.status_code in (429, 503) and attempt < self._busy_retries:
                attempt += 1
                self._sleep(_retry_after(response, attempt))
                continue
            if response.is_success:
                try:
                    return response.json()
                except ValueError as exc:
                    raise Unreachable(
                        f"{self.url} answered {method} {target} with something other than JSON;"
                        " is it a streamherd orchestrator?"
                    ) from exc
            raise _error_of(response)

    def import_lines(self, chunks: Iterable[bytes], *, batch: int) -> dict[str, Any]:
        """``POST /streams/import``: a body of JSON lines sent as ``chunks`` are produced
        (never held whole), created ``batch`` at a time by the orchestrator. Not retried:
        the body is spent, and the batches before a failure stay created."""
        try:
            response = self._http.post(
                f"{API}/streams/import",
                content=chunks,
                params={"batch": batch},
                headers={"Content-Type": "application/x-ndjson"},
                timeout=httpx.Timeout(self._http.timeout.connect, read=None, write=None),
            )
        except httpx.TimeoutException as exc:
            raise Unreachable(f"the orchestrator at {self.url} did not answer in time") from exc
        except (httpx.TransportError, httpx.InvalidURL, ValueError) as exc:
            raise Unreachable(f"cannot reach the orchestrator at {self.url}: {exc}") from exc
        if response.is_success:
            return dict(response.json())
        raise _error_of(response)

    def status_of(self, path: str) -> int:
        """The HTTP status a GET of ``path`` (outside the API) answers with."""
        try:
            return self._http.get(path).status_code
        except httpx.TimeoutException as exc:
            raise Unreachable(f"the orchestrator at {self.url} did not answer in time") from exc
        except (httpx.TransportError, httpx.InvalidURL, ValueError) as exc:
            raise Unreachable(f"cannot reach the orchestrator at {self.url}: {exc}") from exc

    # --- admin calls ------------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        return dict(self.request("GET", "/cluster"))

    def workers(self, state: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", "/workers", params={"state": state} if state else None))

    def worker(self, worker_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/workers/{_segment(worker_id)}"))

    def drain(self, worker_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/workers/{_segment(worker_id)}/drain"))

    def fail(self, worker_id: str) -> dict[str, Any]:
        self.require("post", "/workers/{worker_id}/fail", what="declaring a worker failed")
        return dict(self.request("POST", f"/workers/{_segment(worker_id)}/fail"))

    def issue_token(self, worker_id: str) -> dict[str, Any]:
        self.require("post", "/workers/{worker_id}/tokens", what="per-worker tokens")
        return dict(self.request("POST", f"/workers/{_segment(worker_id)}/tokens"))

    def worker_tokens(self, worker_id: str) -> dict[str, Any]:
        self.require("get", "/workers/{worker_id}/tokens", what="per-worker tokens")
        return dict(self.request("GET", f"/workers/{_segment(worker_id)}/tokens"))

    def revoke_token(self, worker_id: str, token_id: int) -> dict[str, Any]:
        self.require("delete", "/workers/{worker_id}/tokens/{token_id}", what="per-worker tokens")
        return dict(self.request("DELETE", f"/workers/{_segment(worker_id)}/tokens/{token_id}"))

    def rebalance(self, *, dry_run: bool = False) -> dict[str, Any]:
        if not dry_run:
            return dict(self.request("POST", "/rebalance"))
        # An orchestrator that does not know dry_run would ignore it and really rebalance:
        # ask its schema first and send nothing unless the parameter is there.
        self.require("post", "/rebalance", param="dry_run", what="a rebalance preview")
        return dict(self.request("POST", "/rebalance", params={"dry_run": "true"}))

    def stream(self, stream_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/streams/{stream_id}"))

    def patch_stream(self, stream_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/streams/{stream_id}", json=changes))

    def create_streams(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answer = self.request("POST", "/streams", json={"streams": specs})
        return list(answer["created"])

    def streams_page(
        self,
        *,
        status: str | None = None,
        owner: str | None = None,
        limit: int = limits.MAX_PAGE_LIMIT,
        cursor: str | None = None,
        q: str | None = None,
        placeable: bool | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("status", status), ("owner", owner), ("cursor", cursor), ("q", q)):
            if value is not None:
                params[key] = value
        if placeable is not None:
            params["placeable"] = "true" if placeable else "false"
        return dict(self.request("GET", "/streams", params=params))

    def iter_streams(
        self, *, status: str | None = None, owner: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every stream, in id order, a page of ``MAX_PAGE_LIMIT`` at a time."""
        cursor: str | None = None
        while True:
            page = self.streams_page(status=status, owner=owner, cursor=cursor)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def events(self, *, after: int = 0, limit: int = limits.DEFAULT_PAGE_LIMIT) -> dict[str, Any]:
        return dict(self.request("GET", "/events", params={"after": after, "limit": limit}))

    # --- what this orchestrator can do ------------------------------------------------

    def require(self, method: str, path: str, *, what: str, param: str | None = None) -> None:
        """Raise ``TooOld`` unless the orchestrator's OpenAPI schema has this operation."""
        try:
            schema = self.request("GET", "/openapi.json", api=False)
            operation = schema["paths"][f"{API}{path}"][method]
        except (Refused, KeyError, TypeError) as exc:
            raise TooOld(what) from exc
        if param is not None:
            names = {p.get("name") for p in operation.get("parameters", []) if isinstance(p, dict)}
            if param not in names:
                raise TooOld(what)


def _segment(value: str) -> str:
    """A path segment that cannot climb out of its place (``..``, ``/``, ``?``)."""
    return quote(value, safe="")


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        seconds = 0.5 * 2**attempt
    return max(0.0, min(seconds, MAX_RETRY_AFTER_S))
