"""Stand-in of modules/shared_cmd_options.py (v1.10): `parser` and the parsed `cmd_opts`.

The real module runs every extension's preload.py on the parser and then parses sys.argv. The stand-in parses an
empty argument list at import (sys.argv belongs to pytest); `harness` reruns preload and `parse(argv)` per test.
`cmd_opts` is always the same Namespace object (modules import it by name), updated in place by `parse`.
"""

import argparse

from modules import cmd_args

parser = cmd_args.parser

cmd_opts = argparse.Namespace()


def parse(argv=(), parser_=None, known_only=False):
    """Stand-in helper: parse `argv` with `parser_` (default: the current parser) into the shared `cmd_opts`;
    `known_only` ignores unknown flags, as the real module does with IGNORE_CMD_ARGS_ERRORS set."""
    if known_only:
        new, _ = (parser_ or parser).parse_known_args(list(argv))
    else:
        new = (parser_ or parser).parse_args(list(argv))
    new.webui_is_non_local = any([new.share, new.listen, new.ngrok, new.server_name])
    new.disable_extension_access = new.webui_is_non_local and not new.enable_insecure_extension_access
    vars(cmd_opts).clear()
    vars(cmd_opts).update(vars(new))
    return cmd_opts


parse([])
