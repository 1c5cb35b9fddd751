"""How the training/ commands (train.py, evaluate.py, demo.py) report a user error: one way, in one place.

A flag that argparse can check alone is refused by `parser.error` in the command's `parse_args` (usage, then
`error: ...`, exit status 2). Everything found later -- a checkpoint, the data, a saved training state, a flag that
only makes sense against what was loaded -- is raised as an `afa.AfaError` (the core's typed errors derive from it)
and reaches the user through `run`: `error: ...` on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from typing import Callable

from afa.errors import AfaError


def run(main: Callable[[], int]) -> int:
    """Runs a command's `main()` and returns its exit status; an `AfaError` is printed as `error: <message>` and
    gives status 2. Any other exception is a bug and keeps its traceback."""
    try:
        return main()
    except AfaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
