"""The wire contract of streamherd: request and answer models, error codes, limits.

Both services import this package; it imports neither FastAPI, SQLAlchemy nor httpx.
"""

from shared.errors import ErrorCode
from shared.limits import WORKER_ID_PATTERN

__all__ = ["ErrorCode", "WORKER_ID_PATTERN"]
