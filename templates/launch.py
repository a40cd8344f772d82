"""What the flex template launcher does before either pipeline's own ``main``: template parameters to Beam
arguments, and the checks only the launcher can make (the secrets of the HTTP API token and of the PostgreSQL
and Redis passwords are readable).

Dataflow passes every template parameter as one ``--name=value`` argument, which does not fit two kinds of
option: on/off flags (``action="store_true"`` rejects ``=true``) and repeatable options
(``--kafka_consumer_config`` takes one property per occurrence). ``template_arguments`` rewrites both.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, WorkerOptions

from pipelines import backfill, streaming
from pipelines.options import CoreOptions
from transforms.secrets import read_secret_version
from transforms.settings import FALSE_WORDS, TRUE_WORDS
from transforms.sinks.http_api import HttpSinkOptions
from transforms.sinks.redis_top import RedisSinkOptions


class LaunchError(Exception):
    """The template cannot be launched as parameterized; the message is one line for the operator."""


# Each pipeline's own list, so a class it adds is a template parameter (and in its metadata) at once.
STREAMING_OPTIONS: tuple[type[PipelineOptions], ...] = streaming.OPTION_CLASSES
BACKFILL_OPTIONS: tuple[type[PipelineOptions], ...] = backfill.OPTION_CLASSES

MULTI_VALUE_SEPARATOR = "\n"
"""A repeatable option's values in one template parameter are separated by newlines (a Kafka JAAS config
holds ';', '=' and spaces, never a newline)."""


def option_actions(option_classes: Iterable[type[PipelineOptions]]) -> dict[str, argparse.Action]:
    """Option name (without dashes) -> its argparse action, over every class, first declaration winning."""
    actions: dict[str, argparse.Action] = {}
    for options_class in option_classes:
        parser = argparse.ArgumentParser(add_help=False)
        options_class._add_argparse_args(parser)
        for action in parser._actions:
            actions.setdefault(action.dest, action)
    return actions


def template_arguments(argv: Sequence[str], option_classes: Iterable[type[PipelineOptions]]) -> list[str]:
    """``--flag=true`` -> ``--flag``, ``--flag=false`` -> nothing, and ``--repeatable=a\\nb`` -> one argument
    per line; every other argument unchanged."""
    actions = option_actions(option_classes)
    result: list[str] = []
    for argument in argv:
        name, has_value, value = argument.partition("=")
        action = actions.get(name.removeprefix("--")) if name.startswith("--") and has_value else None
        if isinstance(action, argparse._StoreTrueAction):
            word = value.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise LaunchError(f"{name} takes true or false, not {value!r}")
            if word in TRUE_WORDS:
                result.append(name)
        elif isinstance(action, argparse._AppendAction):
            result.extend(f"{name}={line.strip()}" for line in value.split(MULTI_VALUE_SEPARATOR) if line.strip())
        else:
            result.append(argument)
    return result


def prepare(
    argv: Sequence[str],
    option_classes: Iterable[type[PipelineOptions]],
    secret_reader: Callable[[str], str] = read_secret_version,
) -> list[str]:
    """The pipeline's arguments from the template's, after the checks only the launcher can make.

    The secrets (HTTP API token, PostgreSQL and Redis passwords) are read once here, with the job's service
    account, so a wrong name or a missing permission fails the launch with one line instead of every worker's
    ``setup()``. The values are dropped: workers read the secrets themselves (transforms/secrets.py)."""
    arguments = template_arguments(argv, option_classes)
    options = PipelineOptions(arguments)
    if options.view_as(StandardOptions).runner == "DataflowRunner" and not (
        options.view_as(WorkerOptions).sdk_container_image
    ):
        # The workers need the project and its dependencies, which only the template's own image holds.
        raise LaunchError("set sdk_container_image to the template's image (templates/run.sh does)")
    http = options.view_as(HttpSinkOptions)
    if http.http_api_sink != "disabled" and http.http_api_token_secret:
        if http.http_api_token_file:
            raise LaunchError("give http_api_token_secret or http_api_token_file, not both")
        _check_secret(secret_reader, http.http_api_token_secret)
    for password_secret in (
        options.view_as(CoreOptions).postgres_password_secret,
        options.view_as(RedisSinkOptions).redis_password_secret,
    ):
        if password_secret:
            _check_secret(secret_reader, password_secret)
    return arguments


def _check_secret(secret_reader: Callable[[str], str], version_name: str) -> None:
    try:
        value = secret_reader(version_name)
    except ValueError as error:
        raise LaunchError(str(error)) from error
    if not value:
        raise LaunchError(f"the Secret Manager version {version_name} is empty")
