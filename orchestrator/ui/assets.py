"""Files served from memory with a content hash: ``ETag`` revalidation always, and a year
of caching when the URL names the version (``?v=<hash>``), as the page's own links do."""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.abc import Traversable
from typing import Final

from starlette.requests import Request
from starlette.responses import Response

CACHE_VERSIONED: Final = "public, max-age=31536000, immutable"
# Unversioned: the browser keeps a copy but asks (If-None-Match) before using it.
CACHE_REVALIDATE: Final = "no-cache"

_MEDIA_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @classmethod
    def of(cls, name: str, body: bytes) -> Asset:
        suffix = name[name.rfind(".") :] if "." in name else ""
        media_type = _MEDIA_TYPES.get(suffix) or (
            mimetypes.guess_type(name)[0] or "application/octet-stream"
        )
        return cls(body, media_type, hashlib.sha256(body).hexdigest()[:16])

    def response(self, request: Request, *, cache_control: str | None = None) -> Response:
        """200 with the body, or 304 when the browser's copy is current."""
        if cache_control is None:
            versioned = request.query_params.get("v") == self.version
            cache_control = CACHE_VERSIONED if versioned else CACHE_REVALIDATE
        headers = {"ETag": self.etag, "Cache-Control": cache_control}
        presented = request.headers.get("if-none-match", "")
        if self.etag in (tag.strip() for tag in presented.split(",")):
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else self.body
        response = Response(body, media_type=self.media_type, headers=headers)
        if request.method == "HEAD":
            response.headers["content-length"] = str(len(self.body))
        return response


def load(directory: Traversable, names: Iterable[str]) -> dict[str, Asset]:
    return {name: Asset.of(name, directory.joinpath(name).read_bytes()) for name in names}
