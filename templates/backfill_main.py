"""Flex template entry point of the backfill: the streaming template's image with
FLEX_TEMPLATE_PYTHON_PY_FILE=/template/templates/backfill_main.py (templates/build.sh backfill).

The launcher runs this file as a script with the template's parameters as ``--name=value`` arguments.
"""

import sys
from pathlib import Path

# Run as a script, this file's directory is on sys.path, not the project root that holds `templates`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import backfill
from templates.launch import BACKFILL_OPTIONS, LaunchError, prepare


def main() -> int:
    try:
        arguments = prepare(sys.argv[1:], BACKFILL_OPTIONS)
    except LaunchError as error:
        print(f"backfill template: {error}", file=sys.stderr)
        return 2
    return backfill.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
