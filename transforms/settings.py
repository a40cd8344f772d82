"""Settings declared once: a field of a frozen settings dataclass that also names its pipeline option.

A transform takes a validated settings object, never ``PipelineOptions``. Each setting is declared where that
object is, with ``setting(...)``: its default, its option's name and help, and its parsing. Everything else
derives from that declaration:

* the Beam options class registers the declared fields (``add_options``), so its flags, defaults and help are
  the fields';
* ``from_options`` reads them back (``option_values``) and adds only what no single option holds (a URL and
  the source of its password, the window length a sink shares with the aggregation);
* the checks stay in the dataclass's ``__post_init__``, so settings built in tests are checked as well;
* the flex templates' metadata derives from the options classes (templates/generate_metadata.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

_OPTION = "pipeline_option"


@dataclass(frozen=True)
class OptionSpec:
    """How a settings field appears on the command line."""

    flag: str
    help: str
    parse: Callable[[Any], Any] | None
    """The option's value -> the field's, when they differ in form (``""`` for None, KEY=VALUE lines, ...)."""
    option_default: Any
    """The option's default when it differs in form from the field's (``MISSING``: the field's)."""
    argparse_kwargs: Mapping[str, Any]

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--")


TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def parse_bool(text: str | bool) -> bool:
    """An on/off option's value: true/1/yes or false/0/no, any case (a template parameter is always text)."""
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def setting(
    default: Any = MISSING,
    *,
    flag: str,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    parse: Callable[[Any], Any] | None = None,
    option_default: Any = MISSING,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field that is also the pipeline option ``flag``; ``argparse_kwargs`` as ``add_argument``'s."""
    if not flag.startswith("--"):
        raise ValueError(f"an option flag starts with --, not {flag!r}")
    spec = OptionSpec(flag, help, parse, option_default, argparse_kwargs)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_OPTION: spec})


def declared_options(settings_class: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The fields of ``settings_class`` that are pipeline options, in declaration order."""
    return [(f, f.metadata[_OPTION]) for f in dataclasses.fields(settings_class) if _OPTION in f.metadata]


def _option_default(field: dataclasses.Field, spec: OptionSpec) -> Any:
    if spec.option_default is not MISSING:
        return spec.option_default
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, *settings_classes: type) -> None:
    """Registers every declared option of ``settings_classes`` (in ``_add_argparse_args``)."""
    for settings_class in settings_classes:
        for field, spec in declared_options(settings_class):
            parser.add_argument(spec.flag, default=_option_default(field, spec), help=spec.help, **spec.argparse_kwargs)


def option_values(settings_class: type, options: PipelineOptions) -> dict[str, Any]:
    """Field name -> value for the declared options of ``settings_class``.

    ``options`` must be a view of the options class that registered them (``options.view_as(...)``)."""
    values = {}
    for field, spec in declared_options(settings_class):
        value = getattr(options, spec.dest)
        values[field.name] = spec.parse(value) if spec.parse is not None else value
    return values


def print_options_help(prog: str, description: str | None, option_classes: Iterable[type[PipelineOptions]]) -> None:
    """``--help`` of a pipeline's command: every option of ``option_classes``, grouped by class.

    Beam's own ``PipelineOptions(["--help"])`` lists only the options of the class it is viewed as."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for options_class in option_classes:
        group = parser.add_argument_group(options_class.__name__, options_class.__doc__)
        options_class._add_argparse_args(group)
    parser.print_help()
    print("\nAny Beam pipeline option (--runner, --project, --temp_location, ...) is passed to the runner.")
