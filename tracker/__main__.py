"""`tracker serve | migrate`: argument parsing only."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import logs
from .settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tracker", description="Click and conversion tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--listen", help="host:port (TRACKER_LISTEN)")
    serve.add_argument("--workers", type=int, help="worker processes (TRACKER_WORKERS)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply sql/ on start")
    commands.add_parser("migrate", help="apply sql/ to the database")
    dead = commands.add_parser("dead-letters", help="events PostgreSQL refused, by reason")
    dead.add_argument("--replay", action="store_true",
                      help="append them to the stream again (after fixing the cause)")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tracker: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        changes: dict[str, object] = {}
        if args.listen:
            changes["listen"] = args.listen
        if args.workers:
            changes["workers"] = args.workers
        if args.no_migrate:
            changes["migrate_on_start"] = False
        from .serve import serve as run

        return run(settings.with_(**changes))
    if args.command == "migrate":
        from .embedded import servers
        from .storage.migrations import migrate

        logs.configure(settings.log_level)
        with servers(settings.database_url, "unused", settings.data_dir) as found:
            applied = asyncio.run(migrate(found.database_url))
        print("applied: " + ", ".join(applied) if applied else "up to date")
        return 0
    if args.command == "dead-letters":
        from .embedded import servers
        from .replay import replay, show

        logs.configure(settings.log_level)
        with servers(settings.database_url, settings.redis_url if args.replay else "unused",
                     settings.data_dir) as found:
            if args.replay:
                count = asyncio.run(replay(settings.with_(database_url=found.database_url,
                                                          redis_url=found.redis_url)))
                print(f"replayed {count} events into the stream")
            else:
                print(asyncio.run(show(found.database_url)))
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
