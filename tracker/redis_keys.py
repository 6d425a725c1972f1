"""Where everything lives in Redis: every key and channel name, built in one place."""

from __future__ import annotations

import zlib

from .redis_client import is_cluster, shards_for
from .settings import Settings

# Crockford's base 32, the ULID alphabet: a sharded click id spells its shard in its last two
# characters (its 10 lowest bits).
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DIGIT = {c: i for i, c in enumerate(_CROCKFORD)} | {c.lower(): i for i, c in enumerate(_CROCKFORD)}
MAX_SHARDS = 1024


class Keys:
    """Every Redis key and channel name, built in one place.

    Sharded (Redis Cluster, or TRACKER_REDIS_SHARDS > 1), the events are spread over
    `shards` streams, and every key one script touches carries its shard's hash tag
    (`prefix{n}...`), so that each script runs in one slot. A visit's shard is a hash of
    (campaign, visitor): its campaign's uniqueness marks, its stream and the set that finds
    its click before it is committed share a slot. A click id spells its shard in its last
    two characters, so a lookup by id finds the recent click, and a postback the conversion
    keys, without asking anyone. Unsharded, the names are those
    of a single Redis (no tag, one stream).
    """

    def __init__(self, prefix: str, shards: int = 1, tagged: bool = False) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
        self.prefix = prefix
        self.shards = shards
        self.tagged = tagged or shards > 1
        self.streams = [f"{self._tag(n)}events" for n in range(shards)]
        self.group = "writers"
        self.campaigns_channel = f"{prefix}campaigns"

    def _tag(self, shard: int) -> str:
        return f"{self.prefix}{{{shard}}}" if self.tagged else self.prefix

    @property
    def stream(self) -> str:
        """Shard 0's stream: the only one unless sharded (tools put events back there)."""
        return self.streams[0]

    # -- shards ----------------------------------------------------------------------------

    def visit_shard(self, campaign_id: int, visitor_id: str) -> int:
        """The shard of a visitor's clicks on a campaign (stable across processes)."""
        if self.shards == 1:
            return 0
        return zlib.crc32(f"{campaign_id}:{visitor_id}".encode()) % self.shards

    def stamp(self, click_id: str, shard: int) -> str:
        """The click id with its shard spelled in its last two characters."""
        if not self.tagged:
            return click_id
        return click_id[:-2] + _CROCKFORD[shard >> 5] + _CROCKFORD[shard & 31]

    def click_shard(self, click_id: str) -> int:
        """The shard a click id spells (ids minted unsharded spell any number: taken modulo,
        they still name a shard whose stream is read)."""
        if self.shards == 1:
            return 0
        try:
            return ((_DIGIT[click_id[-2]] << 5) | _DIGIT[click_id[-1]]) % self.shards
        except (KeyError, IndexError):
            return 0

    # -- keys ------------------------------------------------------------------------------

    def recent(self, shard: int, click_id: str) -> str:
        """The stream entries holding the clicks whose ids were made in one millisecond (the
        first 10 characters of a ULID): where a click not yet in PostgreSQL is found
        (read-your-writes). The writer takes each entry out once its rows are committed."""
        return f"{self._tag(shard)}recent:{click_id[:10].upper()}"

    def recent_of(self, click_id: str) -> str:
        return self.recent(self.click_shard(click_id), click_id)

    def seen(self, shard: int, campaign_id: int, window: int) -> str:
        """The visitors seen on a campaign in one uniqueness window (window number: time //
        the window's length), each with the millisecond of their unique click: a hash per
        campaign, so that a round marks all its visitors of a campaign at once."""
        return f"{self._tag(shard)}seen:{campaign_id}:{window}"

    def backlog(self, shard: int) -> str:
        """Events of the shard's stream not yet acknowledged (an entry holds several): added
        to by the scripts that append, taken from by the writer's acknowledgement."""
        return f"{self._tag(shard)}backlog"

    def campaign(self, slug: str) -> str:
        """A campaign changed a moment ago, for workers that have not loaded it yet."""
        return f"{self.prefix}campaign:{slug}"

    def click_stream(self, click_id: str) -> str:
        """The stream of a click's shard, where its conversions go too."""
        return self.streams[self.click_shard(click_id)]

    def conversions(self, click_id: str) -> str:
        """A click's conversions' states: v:<f> version, e:<f> latest event, h:<f>:<n>
        history, for each conversion f (event, txid) of the click."""
        return f"{self._tag(self.click_shard(click_id))}conv:{click_id}"

    def conversions_since(self, click_id: str) -> str:
        """From when (ms) Redis holds every conversion state of the click's shard (set when
        missing: at start, and after Redis lost its data)."""
        return f"{self._tag(self.click_shard(click_id))}conv-since"

    def all_conversions_since(self) -> list[str]:
        return [f"{self._tag(n)}conv-since" for n in range(self.shards)]

    def conversion(self, conversion_id: str, click_id: str) -> str:
        """A conversion id's click and field, for lookups by id before PostgreSQL has it."""
        return f"{self._tag(self.click_shard(click_id))}convid:{conversion_id}"

    def conversion_everywhere(self, conversion_id: str) -> list[str]:
        """Where a conversion id's pointer may be: its id does not spell its click's shard."""
        return [f"{self._tag(n)}convid:{conversion_id}" for n in range(self.shards)]

    def writer_alive(self, consumer: str, shard: int) -> str:
        """Set by a live batch writer, expiring claim_idle_ms after its last heartbeat (one
        per shard, in its slot: the check that a writer is gone runs beside the stream)."""
        return f"{self._tag(shard)}writer:{consumer}"


def keys_for(settings: Settings) -> Keys:
    """The key layout every instance of a deployment agrees on."""
    url = settings.redis_url
    return Keys(settings.redis_prefix, shards_for(url, settings.redis_shards), tagged=is_cluster(url))
