"""Writes the flex templates' metadata files from the pipelines' ``PipelineOptions`` classes, so a template
parameter cannot drift from the option it sets: name, help text and default are copied, never retyped.

    .venv/bin/python -m templates.generate_metadata            # rewrite templates/*metadata.json
    .venv/bin/python -m templates.generate_metadata --check    # exit 1 if they are out of date

tests/unit/test_flex_template.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from templates.launch import BACKFILL_OPTIONS, MULTI_VALUE_SEPARATOR, STREAMING_OPTIONS, option_actions
from transforms.secrets import SECRET_VERSION_PATTERN
from transforms.settings import parse_bool

TEMPLATES_DIR = Path(__file__).resolve().parent

# Words that a plain capitalization would get wrong in a label.
_LABEL_WORDS = {
    "api": "API",
    "bigquery": "BigQuery",
    "cdc": "CDC",
    "dsn": "DSN",
    "http": "HTTP",
    "id": "ID",
    "json": "JSON",
    "kafka": "Kafka",
    "postgres": "PostgreSQL",
    "redis": "Redis",
    "ttl": "TTL",
    "url": "URL",
}

_INTEGER = r"^[0-9]+$"
_DECIMAL = r"^[0-9]+(\.[0-9]+)?$"
_BOOLEAN = "^(true|false)$"
_INSTANT = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})$"
# Checks Dataflow can make before launching, where the option's type says too little.
_REGEXES = {
    "bootstrap_servers": r"^[^,\s]+:[0-9]+(,[^,\s]+:[0-9]+)*$",
    "start_offset": rf"^(earliest|latest|resume|{_INSTANT[1:-1]})$",
    "redis_url": r"^rediss?://\S+$",
    "http_api_url": r"^https?://\S+$",
    "http_api_token_env": r"^[A-Za-z_][A-Za-z0-9_]*$",
    "http_api_token_secret": SECRET_VERSION_PATTERN,
    "postgres_password_secret": SECRET_VERSION_PATTERN,
    "redis_password_secret": SECRET_VERSION_PATTERN,
    "start": _INSTANT,
    "end": _INSTANT,
    "kafka_consumer_config": r"^(\s*[A-Za-z0-9_.\-]+=[^\n]*\n?)+$",
    # Unset reads forever; 0, which a console may prefill for an empty NUMBER, would end the read at once.
    "kafka_max_records": r"^[1-9][0-9]*$",
    "kafka_max_read_seconds": r"^[1-9][0-9]*$",
    # Empty (the default) or [TOPIC:]PARTITION:OFFSET entries separated by commas.
    "kafka_start_offsets": r"^(([A-Za-z0-9._\-]+:)?[0-9]+:[0-9]+(,([A-Za-z0-9._\-]+:)?[0-9]+:[0-9]+)*)?$",
}

_GROUPS = {
    "BackfillOptions": "Backfill",
    "CoreOptions": "Core transforms",
    "KafkaReadOptions": "Kafka source",
    "BigQuerySinkOptions": "BigQuery sink",
    "RedisSinkOptions": "Redis sink",
    "HttpSinkOptions": "External HTTP API sink",
    "ResumeOptions": "Restarts",
}


@dataclass(frozen=True)
class TemplateSpec:
    file_name: str
    name: str
    description: str
    option_classes: tuple[type[PipelineOptions], ...]
    required: frozenset[str]
    """Parameters a launch must give: their defaults are the local stack's, meaningless on Dataflow."""
    streaming: bool


TEMPLATES = (
    TemplateSpec(
        file_name="metadata.json",
        name="engagement-streaming",
        description=(
            "Engagement analytics, streaming: Kafka (Debezium CDC and plain JSON events) -> decode, de-duplicate, "
            "enrich with PostgreSQL content, window -> BigQuery (Storage Write API), Redis top content and the "
            "external HTTP API. See README.md, 'Deploy on Dataflow'."
        ),
        option_classes=STREAMING_OPTIONS,
        required=frozenset({"bootstrap_servers", "postgres_dsn", "redis_url"}),
        streaming=True,
    ),
    TemplateSpec(
        file_name="backfill-metadata.json",
        name="engagement-backfill",
        description=(
            "Engagement analytics, backfill: engagement_events with event_ts in [start, end) from PostgreSQL through "
            "the streaming job's transforms into the same sinks, without duplicating what they hold. See "
            "docs/backfill.md."
        ),
        option_classes=BACKFILL_OPTIONS,
        required=frozenset({"start", "end", "postgres_dsn", "redis_url"}),
        streaming=False,
    ),
)


def label(name: str) -> str:
    words = [_LABEL_WORDS.get(word, word) for word in name.split("_")]
    return " ".join([words[0][:1].upper() + words[0][1:], *words[1:]])


def default_value(action: argparse.Action) -> str | None:
    """The option's default as the template parameter's text, or None when it has none to show."""
    default = action.default
    if default is None or default == []:
        return None
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list):
        return MULTI_VALUE_SEPARATOR.join(str(item) for item in default)
    return str(default)


def _is_boolean(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreTrueAction) or action.type is parse_bool


def parameter(action: argparse.Action, group: str, required: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": action.dest,
        "label": label(action.dest),
        "helpText": action.help,
        "isOptional": not required,
        "groupName": group,
    }
    regex = _REGEXES.get(action.dest)
    if action.choices:
        entry["paramType"] = "ENUM"
        entry["enumOptions"] = [{"value": choice} for choice in action.choices]
        regex = "^({})$".format("|".join(action.choices))
    elif _is_boolean(action):
        entry["paramType"] = "BOOLEAN"
        regex = _BOOLEAN
    elif action.type in (int, float):
        entry["paramType"] = "NUMBER"
        regex = regex or (_INTEGER if action.type is int else _DECIMAL)
    else:
        entry["paramType"] = "TEXT"
    if regex:
        entry["regexes"] = [regex]
    default = default_value(action)
    if default is not None and not required:
        entry["defaultValue"] = default
    return entry


def parameters(option_classes: Iterable[type[PipelineOptions]], required: frozenset[str]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for options_class in option_classes:
        for name, action in option_actions([options_class]).items():
            if name in seen or name == "help":
                continue
            seen.add(name)
            entries.append(parameter(action, _GROUPS[options_class.__name__], name in required))
    unknown = required - seen
    if unknown:
        raise ValueError(f"required parameters that no option declares: {sorted(unknown)}")
    return entries


def template_metadata(spec: TemplateSpec) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "streaming": spec.streaming,
    }
    if spec.streaming:
        # Exactly once only: in Dataflow's at-least-once mode an element may come again after the
        # de-duplication and be counted twice in the aggregates. (bigquery_use_at_least_once, the BigQuery
        # writes alone, stays available: the *_unique/_current views hide the copies it may write.)
        metadata |= {"supportsAtLeastOnce": False, "supportsExactlyOnce": True, "defaultStreamingMode": "EXACTLY_ONCE"}
    metadata["parameters"] = parameters(spec.option_classes, spec.required)
    return metadata


def render(spec: TemplateSpec) -> str:
    return json.dumps(template_metadata(spec), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m templates.generate_metadata", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for spec in TEMPLATES:
        path = TEMPLATES_DIR / spec.file_name
        text = render(spec)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(spec.file_name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m templates.generate_metadata", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
