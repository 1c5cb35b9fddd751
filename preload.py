"""AFA's command-line flags, added to the WebUI's parser before it parses the command line
(modules/script_loading.py v1.10: preload_extensions).

Added in every WebUI, also where scripts/afa_script.py registers nothing (Forge and its forks): a flag changes
nothing by itself, and a command line that still carries --afa-dir must not stop the WebUI from starting."""


def preload(parser):
    parser.add_argument("--afa-dir", type=str, default=None,
                        help="folder of AFA SABW weights files (default: models/AFA)")
