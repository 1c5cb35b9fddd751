"""AFA's command-line flags, added to the WebUI's parser before it parses the command line
(modules/script_loading.py v1.10: preload_extensions)."""


def preload(parser):
    parser.add_argument("--afa-dir", type=str, default=None,
                        help="folder of AFA SABW weights files (default: models/AFA)")
