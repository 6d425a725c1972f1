"""Reading one click back."""

from __future__ import annotations

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


async def get(pool: asyncpg.Pool, click_uuid: UUID, ts: datetime) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(GET_CLICK, click_uuid, ts)
    return row
