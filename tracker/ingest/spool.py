"""The local spool: where an event goes when Redis cannot take it, so that a Redis outage
costs neither the visitor's redirect nor the event.

Each worker appends to a file of its own (`<data_dir>/spool/<pid>-<random>.spool`, one JSON
line per event) and holds an exclusive flock on it while it does. Writes reach the page cache
at once and the disk at the next fsync, at most FSYNC_EVERY later (as Redis's
`appendfsync everysec`). The fsync runs in a thread: it can take long on a busy disk, and it
happens during the very outage the spool is for, when the event loop must keep answering.
When Redis answers again, a worker closes its own file (releasing the lock) and replays every
spool file whose lock it can take, its own and those of workers that died, through the same
buffer calls the hot path makes, REPLAY_CHUNK lines at a time (a file holds whatever a long
outage brought: it is never read whole), then deletes the file. A replay cut short is simply
replayed again: event ids are fixed, so PostgreSQL keeps each event once. Uniqueness is
decided at replay time, by the same script as ever.
"""

from __future__ import annotations

import asyncio
import fcntl
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from .. import metrics
from ..storage import rows
from .buffer import EventBuffer

log = logging.getLogger(__name__)

FSYNC_EVERY = 0.2
REPLAY_EVERY = 1.0
REPLAY_CHUNK = 500


class Spool:
    def __init__(self, folder: Path, buffer: EventBuffer) -> None:
        self.folder = folder
        self._buffer = buffer
        self._fd: int | None = None
        self._path: Path | None = None
        self._dirty = False
        # Held while a thread fsyncs the file and while it is closed: a close waits for a
        # running fsync, so a file is handed to a replay (or left at stop) only once synced.
        self._file_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- writing (the hot path, when Redis failed) ---------------------------------------------

    def append_click(self, click_id: str, campaign_id: int, visitor_id: str, is_bot: bool,
                     line: str) -> None:
        self._append({"kind": "click", "id": click_id, "campaign_id": campaign_id,
                      "visitor": visitor_id, "bot": is_bot, "line": line})

    def append_impression(self, impression_id: str, campaign_id: int, visitor_id: str,
                          line: str) -> None:
        self._append({"kind": "impression", "id": impression_id, "campaign_id": campaign_id,
                      "visitor": visitor_id, "line": line})

    def _append(self, record: dict[str, Any]) -> None:
        """Raises OSError when the disk refuses: then the event is lost, and counted."""
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"{os.getpid()}-{os.urandom(4).hex()}"
            # Locked under a name replays do not look at, then renamed (the lock stays with
            # the file): a replay can never take, find empty and delete a file being born.
            hidden = self.folder / f"{name}.new"
            fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._path = self.folder / f"{name}.spool"
            os.rename(hidden, self._path)
            self._fd = fd
        os.write(self._fd, orjson.dumps(record) + b"\n")
        self._dirty = True
        metrics.SPOOL.labels("written").inc()

    async def _sync(self) -> None:
        async with self._file_lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        if self._fd is not None and self._dirty:
            # Cleared first: a line appended while the thread syncs marks the file again.
            self._dirty = False
            try:
                await asyncio.to_thread(_fsync_own, os.dup(self._fd))
            except BaseException:
                self._dirty = True
                raise

    async def _close_own(self) -> None:
        """Finish the current file (synced, unlocked) so that a replay can take it."""
        async with self._file_lock:
            while self._fd is not None and self._dirty:
                await self._sync_locked()
            # No await from the last check to the close: nothing can be appended unsynced.
            if self._fd is not None:
                os.close(self._fd)  # releases the flock
                self._fd = None

    # -- the background task -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spool")

    async def stop(self) -> None:
        """Let the task finish what it does (an fsync, a replay's current chunk), then sync and
        close the file: a later start replays what it holds."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._close_own()

    async def _run(self) -> None:
        next_replay = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), FSYNC_EVERY)
                return  # stop() syncs and closes the file once this task is done
            except asyncio.TimeoutError:
                pass
            try:
                await self._sync()
            except OSError as exc:
                log.error("spool fsync failed: %r", exc)
            if loop.time() >= next_replay:
                next_replay = loop.time() + REPLAY_EVERY
                try:
                    await self.replay()
                except RedisError:
                    pass  # still down: try again next time
                except Exception:  # noqa: BLE001 - the spool must outlive any one failure
                    log.exception("spool replay failed; will try again")

    async def replay(self) -> int:
        """Replay every spool file nobody holds into Redis; return the events replayed."""
        if not self.folder.exists():
            return 0
        files = sorted(self.folder.glob("*.spool"))
        if not files and self._fd is None:
            return 0
        await self._buffer.ping()  # raises while Redis is still away
        if self._fd is not None:
            await self._close_own()
            files = sorted(self.folder.glob("*.spool"))
        replayed = 0
        for path in files:
            replayed += await self._replay_file(path)
        if replayed:
            log.info("replayed %d spooled events into Redis", replayed)
        return replayed

    async def _replay_file(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0  # another worker finished it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # a live worker writes or replays it
            if not path.exists():
                return 0
            replayed = 0
            with os.fdopen(os.dup(fd), "rb") as source:
                while lines := list(itertools.islice(source, REPLAY_CHUNK)):
                    if self._stopping.is_set():
                        return 0  # the file stays: whoever starts next replays it whole
                    records = []
                    for line in lines:
                        try:
                            records.append(orjson.loads(line))
                        except orjson.JSONDecodeError:
                            # A line cut short by a crash mid-write: nothing was answered for it.
                            log.warning("skipping a torn line in %s", path.name)
                    await asyncio.gather(*(self._replay_one(r) for r in records))
                    replayed += len(records)
            path.unlink()
            metrics.SPOOL.labels("replayed").inc(replayed)
            return replayed
        finally:
            os.close(fd)

    async def _replay_one(self, record: dict[str, Any]) -> None:
        if "line" not in record:
            record = _from_json(record)
            if not record:
                return
        if record["kind"] == "click":
            await self._buffer.record_click(record["id"], record["campaign_id"],
                                            record["visitor"], record["bot"], record["line"])
        else:
            await self._buffer.record(record["id"], record["campaign_id"], record["visitor"],
                                      record["line"])


def _from_json(record: dict[str, Any]) -> dict[str, Any]:
    """A record spooled before events were buffered as lines (a JSON event), as a line's
    record; {} for one that could never be stored (the writer would have refused it)."""
    event = record.get("event")
    try:
        if not isinstance(event, dict):
            raise rows.BadEvent(f"not an event: {event!r:.80}")
        if record.get("kind") == "click":
            values = rows.click_row({**event, "is_unique": False}, copy=True)
            return {"kind": "click", "id": event["id"], "campaign_id": event["campaign_id"],
                    "visitor": record["visitor"], "bot": bool(record["bot"]),
                    "line": "\t".join(values[:-1])}
        return {"kind": "impression", "id": event["id"], "campaign_id": event["campaign_id"],
                "visitor": event["visitor_id"],
                "line": "\t".join(rows.impression_row(event, copy=True))}
    except (rows.BadEvent, KeyError, TypeError) as exc:
        log.error("a spooled event that can never be stored, skipped: %r", exc)
        return {}


def _fsync_own(fd: int) -> None:
    """fsync in a thread, on a descriptor of its own that only it closes: even if the task
    awaiting it is cancelled and the spool's descriptor closed meanwhile, the thread never
    syncs a closed descriptor, nor one whose number was handed to another file."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
