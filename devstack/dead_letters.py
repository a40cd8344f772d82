"""``scripts/dead-letters``: the newest dead letters in the local BigQuery emulator, readable in a terminal.

    scripts/dead-letters                 # the 20 newest, every stage
    scripts/dead-letters --stage decode  # one stage
    scripts/dead-letters --summary       # counts per stage and reason

On Google Cloud, query the ``dead_letters`` table itself (sql/bigquery/001_tables.sql).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from google.cloud import bigquery

from devstack import bigquery_clients
from devstack.config import load_config

STAGES = ("decode", "enrich", "bigquery", "redis", "http")


def recent_dead_letters(
    client: bigquery.Client, table: str, limit: int = 20, stage: str | None = None
) -> list[dict[str, Any]]:
    where = "WHERE stage = @stage" if stage else ""
    columns = (
        "stage, reason, payload_text, source_kind, source_topic, source_partition, source_offset, source_table,"
        " source_row_id, event_id, failed_at"
    )
    # The table name is ours (an option with a default), not input data; values go in as parameters.
    query = f"SELECT {columns} FROM `{table}` {where} ORDER BY failed_at DESC LIMIT @limit"  # noqa: S608
    parameters = [bigquery.ScalarQueryParameter("limit", "INT64", limit)]
    if stage:
        parameters.append(bigquery.ScalarQueryParameter("stage", "STRING", stage))
    config = bigquery.QueryJobConfig(query_parameters=parameters)
    return [dict(row) for row in client.query_and_wait(query, job_config=config)]


def summary(client: bigquery.Client, table: str) -> list[dict[str, Any]]:
    query = (
        f"SELECT stage, reason, COUNT(*) AS n FROM `{table}`"  # noqa: S608 - our table
        " GROUP BY stage, reason ORDER BY n DESC, stage, reason"
    )
    return [dict(row) for row in client.query_and_wait(query)]


def describe_source(row: dict[str, Any]) -> str:
    if row["source_kind"] == "kafka":
        return f"kafka:{row['source_topic']}/{row['source_partition']}@{row['source_offset']}"
    if row["source_kind"] == "postgres":
        return f"postgres:{row['source_table']}/{row['source_row_id']}"
    return str(row["source_kind"])


def format_dead_letter(row: dict[str, Any], width: int = 100) -> str:
    payload = (row["payload_text"] or "").replace("\n", " ")
    if len(payload) > width:
        payload = payload[: width - 1] + "…"
    event = f" event {row['event_id']}" if row["event_id"] is not None else ""
    return (
        f"{row['failed_at']:%Y-%m-%d %H:%M:%S}  {row['stage']:<8} {describe_source(row)}{event}\n"
        f"    reason:  {row['reason']}\n"
        f"    payload: {payload}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = load_config()
    parser = argparse.ArgumentParser(prog="scripts/dead-letters", description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, help="only this stage")
    parser.add_argument("--limit", type=int, default=20, help="how many, newest first (default 20)")
    parser.add_argument("--summary", action="store_true", help="counts per stage and reason instead")
    parser.add_argument("--project", default=cfg.bq_project)
    parser.add_argument("--dataset", default=cfg.bq_dataset)
    parser.add_argument("--table", default="dead_letters")
    parser.add_argument("--endpoint", default=cfg.bq_rest_endpoint, help="the emulator's REST endpoint")
    args = parser.parse_args(argv)

    client = bigquery_clients.rest_client(args.endpoint, args.project)
    table = f"{args.project}.{args.dataset}.{args.table}"
    if args.summary:
        rows = summary(client, table)
        for row in rows:
            print(f"{row['n']:>8,}  {row['stage']:<8} {row['reason']}")
    else:
        rows = recent_dead_letters(client, table, args.limit, args.stage)
        print("\n".join(format_dead_letter(row) for row in rows))
    if not rows:
        print(f"no dead letters in {table}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
