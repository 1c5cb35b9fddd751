"""Stand-in of the WebUI's launch.py (v1.10): re-exports modules.launch_utils for extensions' install.py."""

from modules import launch_utils

args = launch_utils.args
python = launch_utils.python
git = launch_utils.git
index_url = launch_utils.index_url
dir_repos = launch_utils.dir_repos

commit_hash = launch_utils.commit_hash
git_tag = launch_utils.git_tag

run = launch_utils.run
is_installed = launch_utils.is_installed
repo_dir = launch_utils.repo_dir

run_pip = launch_utils.run_pip
check_run_python = launch_utils.check_run_python
list_extensions = launch_utils.list_extensions
run_extension_installer = launch_utils.run_extension_installer
