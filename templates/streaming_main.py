"""Flex template entry point of the streaming job (FLEX_TEMPLATE_PYTHON_PY_FILE in templates/Dockerfile).

The launcher runs this file as a script with the template's parameters as ``--name=value`` arguments.
"""

import sys
from pathlib import Path

# Run as a script, this file's directory is on sys.path, not the project root that holds `templates`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import streaming
from templates.launch import STREAMING_OPTIONS, LaunchError, prepare


def main() -> int:
    try:
        arguments = prepare(sys.argv[1:], STREAMING_OPTIONS)
    except LaunchError as error:
        print(f"streaming template: {error}", file=sys.stderr)
        return 2
    # streaming.main reads its arguments from sys.argv.
    sys.argv[1:] = arguments
    return streaming.main()


if __name__ == "__main__":
    sys.exit(main())
