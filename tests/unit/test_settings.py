"""Settings declared once (transforms/settings.py): the options, their defaults and the values read back."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, dataclass
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import CoreSettings
from transforms.aggregate import WindowSettings
from transforms.decode import DecodeLimits
from transforms.kafka_source import KafkaReadSettings
from transforms.settings import add_options, declared_options, option_values, setting
from transforms.sinks.bigquery import BigQuerySinkSettings
from transforms.sinks.http_api import HttpSinkSettings
from transforms.sinks.http_delivery import RetryPolicy
from transforms.sinks.redis_layout import RankingSettings, RedisKeys
from transforms.sinks.redis_top import RedisSinkSettings


def _words(text: str) -> tuple[str, ...]:
    return tuple(word for word in text.split(",") if word)


@dataclass(frozen=True)
class _Example:
    name: str = setting(flag="--example_name", option_default="unnamed", help="A required field's option.")
    size: int = setting(3, flag="--example_size", type=int, help="A plain option.")
    words: tuple[str, ...] = setting(
        (), flag="--example_words", option_default="", parse=_words, help="An option whose form differs."
    )
    derived: int = 0


class _ExampleOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        add_options(parser, _Example)


def test_the_declared_fields_become_options_with_their_defaults_and_help() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, _Example)
    actions = {action.dest: action for action in parser._actions}

    assert actions["example_name"].default == "unnamed"
    assert actions["example_size"].default == 3
    assert actions["example_size"].help == "A plain option."
    assert actions["example_words"].default == ""
    assert "derived" not in actions


def test_option_values_read_the_options_back_in_the_fields_form() -> None:
    options = PipelineOptions(["--example_size=7", "--example_words=a,b"]).view_as(_ExampleOptions)

    assert option_values(_Example, options) == {"name": "unnamed", "size": 7, "words": ("a", "b")}
    assert _Example(**option_values(_Example, options), derived=1) == _Example("unnamed", 7, ("a", "b"), 1)


def test_a_flag_must_look_like_one() -> None:
    with pytest.raises(ValueError, match="starts with --"):
        setting(1, flag="size", help="no dashes")


def _field_defaults(settings: object) -> dict[str, object]:
    """The declared fields whose dataclass default exists, with the value ``settings`` holds for each."""
    defaults = {}
    for field, _ in declared_options(type(settings)):
        if field.default is not MISSING or field.default_factory is not MISSING:
            defaults[field.name] = getattr(settings, field.name)
    return defaults


def _expected_defaults(settings_class: type) -> dict[str, object]:
    expected = {}
    for field, _ in declared_options(settings_class):
        if field.default is not MISSING:
            expected[field.name] = field.default
        elif field.default_factory is not MISSING:
            expected[field.name] = field.default_factory()
    return expected


def test_an_option_left_out_gives_the_fields_default_everywhere(tmp_path: Path) -> None:
    # The option's default, read back through its parser, is the field's: a settings object built in a test
    # and one built from an empty command line are the same.
    token = tmp_path / "token"
    token.write_text("a token")
    options = PipelineOptions(
        [
            "--bigquery_project=p",
            "--http_api_url=http://127.0.0.1:9/events",
            f"--http_api_token_file={token}",
            "--http_api_intents_table=",
        ]
    )
    core = CoreSettings.from_options(options, streaming=True)
    redis = RedisSinkSettings.from_options(options, window_seconds=60)
    http = HttpSinkSettings.from_options(options)
    assert http is not None
    built = {
        WindowSettings: core.windows,
        DecodeLimits: core.decode,
        CoreSettings: core,
        KafkaReadSettings: KafkaReadSettings.from_options(options),
        RedisKeys: redis.keys,
        RankingSettings: redis.ranking,
        RedisSinkSettings: redis,
        BigQuerySinkSettings: BigQuerySinkSettings.from_options(options),
        HttpSinkSettings: http,
        RetryPolicy: http.retry,
    }
    for settings_class, settings in built.items():
        assert declared_options(settings_class), settings_class
        assert _field_defaults(settings) == _expected_defaults(settings_class), settings_class


def test_every_flag_is_declared_once() -> None:
    flags = [
        spec.flag
        for settings_class in (
            WindowSettings,
            DecodeLimits,
            CoreSettings,
            KafkaReadSettings,
            RedisKeys,
            RankingSettings,
            RedisSinkSettings,
            BigQuerySinkSettings,
            HttpSinkSettings,
            RetryPolicy,
        )
        for _, spec in declared_options(settings_class)
    ]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("job", ["streaming", "backfill"])
def test_each_jobs_help_lists_every_option_of_its_classes(
    job: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines import backfill, streaming

    module = {"streaming": streaming, "backfill": backfill}[job]
    monkeypatch.setattr(sys, "argv", [f"pipelines.{job}", "--help"])
    assert (module.main() if job == "streaming" else module.main(["--help"])) == 0
    printed = capsys.readouterr().out
    flags = {action.option_strings[0] for options_class in module.OPTION_CLASSES for action in _actions(options_class)}
    assert "--window_seconds" in flags
    assert [flag for flag in flags if flag not in printed] == []


def _actions(options_class: type[PipelineOptions]) -> list[argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    options_class._add_argparse_args(parser)
    return parser._actions
