"""The audit trail: every admin action as an ``admin_action`` event naming who did it.

Routes record through ``AuditLog.record`` once the action succeeded (``api.deps.AuditDep``
binds it to the caller), so the domain functions stay caller-free. ``caller`` is the name
of the credential ("admin token (previous)", "worker token w1#3", "cert CN=..."), never
its value.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from orchestrator import events as ev
from orchestrator.context import Context

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def record(
        self,
        caller: str,
        action: str,
        *,
        worker_id: str | None = None,
        stream_id: int | None = None,
        **targets: Any,
    ) -> None:
        """Write one ``admin_action`` event: ``{"action", "caller", **targets}``."""
        now = self.ctx.clock.wall()

        async def work(session: AsyncSession) -> None:
            await ev.record_one(
                session,
                ev.ADMIN_ACTION,
                now,
                worker_id=worker_id,
                stream_id=stream_id,
                action=action,
                caller=caller,
                **targets,
            )

        # Nothing a heartbeat answers with changed: cached views stay.
        await self.ctx.db.write(work, changes=False)
        self.ctx.signal.changed()  # the live feed shows it now, not at the next change
        log.info(
            "orchestrator.admin_action",
            extra={
                "action": action,
                "caller": caller,
                "worker_id": worker_id,
                "stream_id": stream_id,
            },
        )
