"""``scripts/top-content``: prints the current top content from Redis, once or every few seconds.

The ranking is computed live from the per-window buckets the Redis sink writes (``read_top_content``),
so it is exact and current even between two refreshes of the materialized ``<prefix>:top:10m`` key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import redis

from transforms.sinks.redis_client import connect
from transforms.sinks.redis_layout import (
    DEFAULT_PREFIX,
    RankingSettings,
    TopEntry,
    read_ranking_settings,
    read_top_content,
)

_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def _clip(text: str | None, width: int) -> str:
    text = text or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S")


def format_top(entries: Sequence[TopEntry], now: float, ranking: RankingSettings, prefix: str) -> str:
    """The ranking as a fixed-width table with a header naming the exact buckets it covers."""
    starts = ranking.bucket_starts(now)
    header = (
        f"Top content, last {ranking.horizon_minutes} min: {ranking.bucket_count} buckets of "
        f"{ranking.window_seconds} s, {_utc(starts[-1])} to {_utc(starts[0] + ranking.window_seconds)} UTC "
        f"(now {_utc(now)}), prefix {prefix!r}"
    )
    lines = [header, f"{'rank':>4}  {'engagement s':>14}  {'events':>8}  {'type':<10}  {'title':<40}  slug"]
    lines += [
        f"{entry.rank:>4}  {entry.engagement_seconds:>14}  {entry.event_count:>8}  "
        f"{_clip(entry.content_type, 10):<10}  {_clip(entry.title, 40):<40}  {_clip(entry.slug, 60)}"
        for entry in entries
    ]
    if not entries:
        lines.append("   (no ranked content in this period)")
    return "\n".join(lines)


def entries_as_json(entries: Sequence[TopEntry]) -> str:
    return json.dumps(
        [
            {
                "rank": entry.rank,
                "content_id": entry.content_id,
                "title": entry.title,
                "slug": entry.slug,
                "content_type": entry.content_type,
                "engagement_seconds": str(entry.engagement_seconds),
                "event_count": entry.event_count,
            }
            for entry in entries
        ],
        indent=2,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="top-content",
        description=(
            "Print the top content of the last minutes from the Redis sink's buckets (rank, engagement "
            "seconds, events, type, title, slug). See docs/redis.md."
        ),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("STACK_REDIS_URL"),
        help="Redis URL (default: $STACK_REDIS_URL, which scripts/top-content sets to the local stack's Redis).",
    )
    parser.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"Key prefix the sink writes under (default {DEFAULT_PREFIX})."
    )
    parser.add_argument("-n", "--top", type=int, default=10, help="How many entries to print (default 10).")
    parser.add_argument(
        "--window-seconds",
        type=int,
        default=None,
        help="Bucket length in seconds (default: what the sink recorded in <prefix>:meta, else 60).",
    )
    parser.add_argument(
        "--horizon-minutes",
        type=int,
        default=None,
        help="Ranking length in minutes (default: what the sink recorded in <prefix>:meta, else 10).",
    )
    parser.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        default=None,
        help="Reprint every SECONDS seconds until interrupted, instead of printing once.",
    )
    parser.add_argument("--json", action="store_true", help="Print the entries as JSON instead of a table.")
    return parser


def _ranking(client: redis.Redis, args: argparse.Namespace) -> RankingSettings:
    recorded = read_ranking_settings(client, args.prefix) or RankingSettings()
    return RankingSettings(
        window_seconds=args.window_seconds or recorded.window_seconds,
        horizon_minutes=args.horizon_minutes or recorded.horizon_minutes,
    )


def render(client: redis.Redis, args: argparse.Namespace, now: float) -> str:
    ranking = _ranking(client, args)
    entries = read_top_content(client, args.prefix, now=now, n=args.top, ranking=ranking)
    return entries_as_json(entries) if args.json else format_top(entries, now, ranking, args.prefix)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.top <= 0:
        build_parser().error("--top must be positive")
    if args.watch is not None and args.watch <= 0:
        build_parser().error("--watch must be positive")
    if not args.redis_url:
        build_parser().error("give --redis-url or set STACK_REDIS_URL (scripts/top-content does)")
    client = connect(args.redis_url)
    clear = args.watch is not None and out.isatty() and not args.json
    try:
        while True:
            try:
                text = render(client, args, time.time())
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if args.watch is None:
                    print(f"top-content: Redis unreachable: {exc}", file=sys.stderr)
                    return 1
                # While watching, a restarting Redis is a moment to wait out, not a reason to quit.
                text = f"top-content: Redis unreachable ({exc}); retrying in {args.watch:g} s"
            except ValueError as exc:
                print(f"top-content: {exc}", file=sys.stderr)
                return 2
            print((_CLEAR_SCREEN if clear else "") + text, file=out, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
            if not clear:
                print(file=out)
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()
        client.connection_pool.disconnect()


if __name__ == "__main__":
    sys.exit(main())
