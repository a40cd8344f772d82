"""The live view of scripts/run-local reads the job's schema-drift warnings from its log as it grows."""

from __future__ import annotations

from pathlib import Path

from devstack.run_local import SchemaDriftWatch

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
