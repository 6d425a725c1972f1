"""Reading one click back."""

from __future__ import annotations

import asyncio
from datetime import datetime
from uuid import UUID

import asyncpg

GET_CLICK = """
SELECT c.id, c.ts, c.campaign_id, k.slug AS campaign, c.visitor_id, c.pub, c.sub1, c.sub2,
       c.sub3, c.sub4, c.sub5, c.ext_click_id, c.utm_source, c.utm_medium, c.utm_campaign,
       c.utm_term, c.utm_content, c.customer_id, c.gclid, c.gbraid, c.wbraid, c.fbclid,
       c.ttclid, c.msclkid, host(c.ip) AS ip, c.country, c.device,
       c.is_unique, c.is_bot, c.destination, c.cost
FROM clicks c LEFT JOIN campaigns k ON k.id = c.campaign_id
WHERE c.id = $1 AND c.ts = $2
"""


# The same, for many clicks at once. `ts = ANY(...)` keeps the plan to the partitions of the
# days asked for.
GET_CLICKS = GET_CLICK.replace("WHERE c.id = $1 AND c.ts = $2",
                               "WHERE c.id = ANY($1::uuid[]) AND c.ts = ANY($2::timestamptz[])")


async def get(pool: asyncpg.Pool, click_uuid: UUID, ts: datetime) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(GET_CLICK, click_uuid, ts)
    return row


class ClickReads:
    """Clicks read by id, the reads of one event-loop tick in one query.

    Postbacks for clicks already committed read them here (their stream entry is gone): one
    query per click cost PostgreSQL a plan over the partitioned table each, and a round trip
    through the pool; a tick's worth shares both."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._asked: list[tuple[UUID, datetime, asyncio.Future[asyncpg.Record | None]]] = []
        self._reading: set[asyncio.Task[None]] = set()

    def get(self, click_uuid: UUID, ts: datetime) -> asyncio.Future[asyncpg.Record | None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[asyncpg.Record | None] = loop.create_future()
        if not self._asked:
            loop.call_soon(self._read)
        self._asked.append((click_uuid, ts, future))
        return future

    def _read(self) -> None:
        asked, self._asked = self._asked, []
        task = asyncio.get_running_loop().create_task(self._fetch(asked))
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _fetch(self, asked: list[tuple[UUID, datetime,
                                            asyncio.Future[asyncpg.Record | None]]]) -> None:
        try:
            rows = await self._pool.fetch(GET_CLICKS, [a[0] for a in asked],
                                          sorted({a[1] for a in asked}))
        except Exception as exc:  # noqa: BLE001 - each asker learns of it
            for _, _, future in asked:
                if not future.done():
                    future.set_exception(exc)
            return
        found = {row["id"]: row for row in rows}
        for click_uuid, _, future in asked:
            if not future.done():
                future.set_result(found.get(click_uuid))
