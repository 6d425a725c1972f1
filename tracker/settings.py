"""Every setting the service reads, from the environment, in one place.

The README's table of variables is this module; keep them together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path


class SettingsError(ValueError):
    """A variable is set to something the service cannot use."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _shards(env: Mapping[str, str]) -> int:
    shards = _int(env, "TRACKER_REDIS_SHARDS", 0)
    if shards > 1024:
        raise SettingsError(f"TRACKER_REDIS_SHARDS must be at most 1024, got {shards}")
    return shards


@dataclass(frozen=True)
class Settings:
    # Where the data lives. Empty means the embedded default (started by `tracker serve`).
    database_url: str = ""
    redis_url: str = ""
    # Bearer token of the operator API. Empty: `serve` makes one and keeps it in data_dir.
    api_token: str = ""
    listen: str = "127.0.0.1:8080"
    # Where /metrics, /healthz and /readyz answer instead of the public port (empty: there).
    admin_listen: str = ""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Base of the tracking URLs handed out in campaign responses; https turns on
    # `SameSite=None; Secure` cookies.
    public_url: str = ""
    # Embedded servers' data, the generated token, and the metrics of all workers.
    data_dir: Path = Path(".tracker-data")
    migrate_on_start: bool = True
    # Prefix of every Redis key, so that several deployments (or test runs) share one Redis.
    redis_prefix: str = "tracker:"
    # How many event streams (shards) the events are spread over; 0: one on a single Redis,
    # 16 on a Redis Cluster. Every instance must agree. Changing it starts the uniqueness
    # windows afresh (a visitor's key moves to another shard).
    redis_shards: int = 0
    # Batch writer: up to batch_size events, or whatever arrived within batch_wait_ms.
    batch_size: int = 5000
    batch_wait_ms: int = 100
    # Under load (a read of 32+ events), wait this long for a fuller batch before writing:
    # each transaction costs PostgreSQL about 1 ms besides its rows (measured: 12 us a row in
    # batches of 500, 9.5 in batches of 2,000), so the busier, the fuller.
    batch_linger_ms: int = 150
    # A writer that has not said it is alive for this long is dead: its pending events are
    # claimed by a live one. A live writer's batch is never taken, however long it takes.
    claim_idle_ms: int = 10_000
    # How often a worker asks PostgreSQL whether campaigns changed (announcements on Redis
    # make it immediate; this catches those missed while Redis was away).
    campaign_refresh_seconds: int = 5
    # How long a click stays readable from Redis (read-your-writes before PostgreSQL has it).
    click_cache_ttl: int = 3600
    unique_window: int = 86_400
    # /readyz turns 503 when this many events wait for PostgreSQL.
    backlog_limit: int = 1_000_000
    geoip_db: str = ""
    # A header set by a trusted proxy with the visitor's ISO country code. Empty (the
    # default): no header is trusted, since without that proxy in front the client writes it.
    country_header: str = ""
    # How many proxies in front of us append to X-Forwarded-For (0: use the peer address).
    proxy_hops: int = 0
    # Connections each worker's fast path keeps open. At the cap a new connection closes the
    # one that has waited longest for a request, or is refused when every one is mid-request.
    max_connections: int = 10_000
    partition_days_ahead: int = 7
    retention_days: int = 0  # 0 keeps raw events forever
    log_level: str = "INFO"
    # Conversions: how long Redis keeps a click's conversion states (the fast answer to a
    # repeated postback; older ones are read from PostgreSQL).
    conversion_state_ttl: int = 7 * 86_400
    # HMAC-signed postbacks: how far a signature's timestamp may be from our clock.
    signature_tolerance_seconds: int = 300
    # Outbound postbacks: each try's timeout, the first retry's delay (doubled each try, with
    # jitter, capped at an hour), how long to keep trying, and whether targets on private,
    # loopback or link-local addresses are allowed (off: no requests into our own network).
    postback_timeout_seconds: int = 10
    postback_backoff_ms: int = 30_000
    postback_retry_hours: int = 24
    postback_allow_private: bool = False
    # Multi-touch attribution: how far back a conversion's touches are looked for.
    attribution_lookback_days: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        listen = env.get("TRACKER_LISTEN", "").strip() or cls.listen
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise SettingsError(f"TRACKER_LISTEN must be host:port, got {listen!r}")
        admin_listen = env.get("TRACKER_ADMIN_LISTEN", "").strip()
        if admin_listen:
            admin_host, _, admin_port = admin_listen.rpartition(":")
            if not admin_host or not admin_port.isdigit():
                raise SettingsError(f"TRACKER_ADMIN_LISTEN must be host:port, got {admin_listen!r}")
            if admin_listen == listen:
                raise SettingsError("TRACKER_ADMIN_LISTEN must differ from TRACKER_LISTEN")
        public_url = env.get("TRACKER_PUBLIC_URL", "").strip().rstrip("/")
        if public_url and not public_url.startswith(("http://", "https://")):
            raise SettingsError("TRACKER_PUBLIC_URL must start with http:// or https://")
        return cls(
            database_url=env.get("DATABASE_URL", "").strip(),
            redis_url=env.get("REDIS_URL", "").strip(),
            api_token=env.get("TRACKER_API_TOKEN", "").strip(),
            listen=listen,
            admin_listen=admin_listen,
            workers=_int(env, "TRACKER_WORKERS", os.cpu_count() or 1, minimum=1),
            public_url=public_url,
            data_dir=Path(env.get("TRACKER_DATA_DIR", "").strip() or ".tracker-data"),
            migrate_on_start=_bool(env, "TRACKER_MIGRATE", True),
            redis_prefix=env.get("TRACKER_REDIS_PREFIX", "").strip() or "tracker:",
            redis_shards=_shards(env),
            batch_size=_int(env, "TRACKER_BATCH_SIZE", 5000, minimum=1),
            batch_wait_ms=_int(env, "TRACKER_BATCH_WAIT_MS", 100, minimum=1),
            batch_linger_ms=_int(env, "TRACKER_BATCH_LINGER_MS", 150),
            claim_idle_ms=_int(env, "TRACKER_CLAIM_IDLE_MS", 10_000, minimum=100),
            campaign_refresh_seconds=_int(env, "TRACKER_CAMPAIGN_REFRESH_SECONDS", 5, minimum=1),
            click_cache_ttl=_int(env, "TRACKER_CLICK_CACHE_TTL", 3600, minimum=60),
            unique_window=_int(env, "TRACKER_UNIQUE_WINDOW", 86_400, minimum=1),
            backlog_limit=_int(env, "TRACKER_BACKLOG_LIMIT", 1_000_000, minimum=1),
            geoip_db=env.get("TRACKER_GEOIP_DB", "").strip(),
            country_header=env.get("TRACKER_COUNTRY_HEADER", "").strip(),
            proxy_hops=_int(env, "TRACKER_PROXY_HOPS", 0),
            max_connections=_int(env, "TRACKER_MAX_CONNECTIONS", 10_000, minimum=1),
            partition_days_ahead=_int(env, "TRACKER_PARTITION_DAYS_AHEAD", 7, minimum=1),
            retention_days=_int(env, "TRACKER_RETENTION_DAYS", 0),
            log_level=env.get("TRACKER_LOG_LEVEL", "").strip().upper() or "INFO",
            conversion_state_ttl=_int(env, "TRACKER_CONVERSION_STATE_TTL", 7 * 86_400,
                                      minimum=3600),
            signature_tolerance_seconds=_int(env, "TRACKER_SIGNATURE_TOLERANCE", 300, minimum=1),
            postback_timeout_seconds=_int(env, "TRACKER_POSTBACK_TIMEOUT", 10, minimum=1),
            postback_backoff_ms=_int(env, "TRACKER_POSTBACK_BACKOFF_MS", 30_000, minimum=1),
            postback_retry_hours=_int(env, "TRACKER_POSTBACK_RETRY_HOURS", 24, minimum=1),
            postback_allow_private=_bool(env, "TRACKER_POSTBACK_ALLOW_PRIVATE", False),
            attribution_lookback_days=_int(env, "TRACKER_ATTRIBUTION_LOOKBACK_DAYS", 30,
                                           minimum=1),
        )

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def admin_host(self) -> str:
        return self.admin_listen.rpartition(":")[0].strip("[]")

    @property
    def admin_port(self) -> int:
        return int(self.admin_listen.rpartition(":")[2])

    @property
    def base_url(self) -> str:
        """The public base of tracking URLs: TRACKER_PUBLIC_URL, else where we listen."""
        return self.public_url or f"http://{self.listen}"

    @property
    def secure_cookies(self) -> bool:
        return self.base_url.startswith("https://")

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
