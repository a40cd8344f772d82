"""The live view of scripts/run-local: schema drift read from the job's log as it grows, and the sinks' counts."""

from __future__ import annotations

from pathlib import Path

from devstack.run_local import SchemaDriftWatch, SinkCounts

GONE = (
    "2026-12-04 23:40:01 WARNING transforms.decode: schema drift: change records of engagement_events no longer "
    "carry column 'device' (renamed or dropped?); their events flow on with device NULL, counted in "
    "decode/schema_drift_missing_device"
)
BACK = (
    "2026-12-04 23:42:09 WARNING transforms.decode: schema drift: change records of engagement_events carry "
    "column 'device' again"
)


def test_only_this_runs_lines_count_and_the_latest_line_per_column_wins(tmp_path: Path) -> None:
    log = tmp_path / "pipeline.log"
    log.write_text(f"{GONE}\n")  # an earlier run's
    watch = SchemaDriftWatch(log)
    assert watch.lines() == []

    with log.open("a") as out:
        out.write("INFO something else\n" + GONE + "\n" + BACK[:40])  # the last line is still being written
    assert watch.lines() == [GONE.split("schema drift: ")[1][:160]]

    with log.open("a") as out:
        out.write(BACK[40:] + "\n")
    assert watch.lines() == ["change records of engagement_events carry column 'device' again"]


def test_a_missing_log_is_no_drift(tmp_path: Path) -> None:
    assert SchemaDriftWatch(tmp_path / "absent.log").lines() == []


def test_the_sinks_are_counted_at_most_every_interval_and_the_view_says_how_long_ago() -> None:
    taken: list[int] = []

    def count() -> dict[str, str]:
        taken.append(len(taken))
        return {"BigQuery events": f"{len(taken) * 100:,}"}

    sinks = SinkCounts(count, every=10.0)
    assert sinks.lines(1000.0) == ["Sinks (counted 0s ago, every 10s):", f"  {'BigQuery events':<20} 100"]
    assert sinks.lines(1004.0)[0] == "Sinks (counted 4s ago, every 10s):"
    assert sinks.lines(1009.9)[1].endswith(" 100")
    assert len(taken) == 1
    assert sinks.lines(1010.0) == ["Sinks (counted 0s ago, every 10s):", f"  {'BigQuery events':<20} 200"]
    assert len(taken) == 2
