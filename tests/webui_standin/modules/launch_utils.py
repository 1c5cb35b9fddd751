"""Stand-in of modules/launch_utils.py (v1.10): the helpers `launch.py` re-exports for install.py scripts.

`is_installed`, `run`, `run_extension_installer` and `list_extensions` are the real logic. `run_pip` records the
command in `pip_calls` and returns instead of running pip (CI has no package index; the real one runs
`python -m pip <command> --prefer-binary`). `git_tag()` reports the version the stand-in imitates.
"""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

from modules import cmd_args, errors
from modules.paths_internal import script_path, extensions_dir  # noqa: F401

args, _ = cmd_args.parser.parse_known_args([])

python = sys.executable
git = os.environ.get('GIT', "git")
index_url = os.environ.get('INDEX_URL', "")
dir_repos = "repositories"

default_command_live = (os.environ.get('WEBUI_LAUNCH_LIVE_OUTPUT') == "1")

STANDIN_VERSION = "v1.10.1"

pip_calls: list = []
"""stand-in: every `run_pip(command, desc)` call, as (command, desc)"""


def git_tag():
    return STANDIN_VERSION


def commit_hash():
    return "<none>"


# modules/launch_utils.py (v1.10): run
def run(command, desc=None, errdesc=None, custom_env=None, live: bool = default_command_live) -> str:
    if desc is not None:
        print(desc)

    run_kwargs = {
        "args": command,
        "shell": True,
        "env": os.environ if custom_env is None else custom_env,
        "encoding": 'utf8',
        "errors": 'ignore',
    }

    if not live:
        run_kwargs["stdout"] = run_kwargs["stderr"] = subprocess.PIPE

    result = subprocess.run(**run_kwargs)

    if result.returncode != 0:
        error_bits = [
            f"{errdesc or 'Error running command'}.",
            f"Command: {command}",
            f"Error code: {result.returncode}",
        ]
        if result.stdout:
            error_bits.append(f"stdout: {result.stdout}")
        if result.stderr:
            error_bits.append(f"stderr: {result.stderr}")
        raise RuntimeError("\n".join(error_bits))

    return (result.stdout or "")


# modules/launch_utils.py (v1.10): is_installed
def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False

        return spec is not None

    return dist is not None


def repo_dir(name):
    return os.path.join(script_path, dir_repos, name)


def run_pip(command, desc=None, live=default_command_live):
    """stand-in: records the call instead of running `python -m pip {command} --prefer-binary{index_url_line}`"""
    if args.skip_install:
        return

    pip_calls.append((command, desc))
    return ""


def check_run_python(code: str) -> bool:
    result = subprocess.run([python, "-c", code], capture_output=True, shell=False)
    return result.returncode == 0


# modules/launch_utils.py (v1.10): run_extension_installer
def run_extension_installer(extension_dir):
    path_installer = os.path.join(extension_dir, "install.py")
    if not os.path.isfile(path_installer):
        return

    try:
        env = os.environ.copy()
        env['PYTHONPATH'] = f"{script_path}{os.pathsep}{env.get('PYTHONPATH', '')}"

        stdout = run(f'"{python}" "{path_installer}"', errdesc=f"Error running install.py for extension {extension_dir}", custom_env=env).strip()
        if stdout:
            print(stdout)
    except Exception as e:
        errors.report(str(e))


def list_extensions(settings_file):
    settings = {}

    try:
        import json
        with open(settings_file, "r", encoding="utf8") as file:
            settings = json.load(file)
    except FileNotFoundError:
        pass
    except Exception:
        errors.report(f'\nCould not load settings\nThe config file "{settings_file}" is likely corrupted\nIt has been moved to the "tmp/config.json"\nReverting config to default\n\n''', exc_info=True)

    disabled_extensions = set(settings.get('disabled_extensions', []))
    disable_all_extensions = settings.get('disable_all_extensions', 'none')

    if disable_all_extensions != 'none' or args.disable_extra_extensions or args.disable_all_extensions or not os.path.isdir(extensions_dir):
        return []

    return [x for x in os.listdir(extensions_dir) if x not in disabled_extensions]
