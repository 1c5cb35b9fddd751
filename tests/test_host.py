"""The extension inside a WebUI's folder but outside the WebUI's process (afa/host.py): `python -m afa` run with the
WebUI's venv, which has no `ldm` package (A1111 vendors it as repositories/stable-diffusion-stability-ai and puts
that on the path itself), and the test suite collected from `<webui>/extensions/<this extension>`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The WebUI's venv in miniature: `import ldm` fails unless a folder on sys.path provides it (the installed package
# of this test environment is hidden).
HIDE_INSTALLED_LDM = '''
import importlib.abc, importlib.machinery, sys

class HideInstalledLdm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "ldm":
            return None
        vendored = [entry for entry in sys.path if entry.endswith("stable-diffusion-stability-ai")]
        spec = importlib.machinery.PathFinder.find_spec(name, vendored) if vendored else None
        if spec is None:
            raise ModuleNotFoundError("No module named 'ldm'", name="ldm")
        return spec

sys.meta_path.insert(0, HideInstalledLdm())
'''


def fake_webui(tmp_path: Path) -> Path:
    """`<tmp>/webui` laid out like an A1111 install: models/, the vendored ldm repository (a link to this
    environment's ldm package) and this extension copied into extensions/afa. Returns the extension's folder."""
    import ldm

    root = tmp_path / "webui"
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    vendored = root / "repositories" / "stable-diffusion-stability-ai"
    vendored.mkdir(parents=True)
    (vendored / "ldm").symlink_to(Path(ldm.__file__).parent, target_is_directory=True)
    extension = root / "extensions" / "afa"
    for name in ("afa", "training", "tests", "scripts"):
        shutil.copytree(REPO / name, extension / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("preload.py", "install.py"):
        shutil.copy2(REPO / name, extension / name)
    return extension


def test_python_m_afa_runs_with_the_webuis_venv(tmp_path, checkpoint_factory):
    extension = fake_webui(tmp_path)
    checkpoint = checkpoint_factory(1)
    code = HIDE_INSTALLED_LDM + (
        "import runpy\n"
        f"sys.argv = ['afa', 'inspect', {str(checkpoint)!r}]\n"
        "try:\n"
        "    runpy.run_module('afa', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    from afa.ensemble import LDM_BLOCKS\n"
        "    LDM_BLOCKS._openaimodel()\n"  # what an ensemble imports at its first block (afa imports no ldm itself)
        "    print('ldm from', sys.modules['ldm'].__path__[0] if 'ldm' in sys.modules else None)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=extension, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sha256 " in result.stdout and "UNet parameters" in result.stdout
    assert f"ldm from {extension.parent.parent / 'repositories' / 'stable-diffusion-stability-ai' / 'ldm'}" \
        in result.stdout


def test_the_suite_is_collected_from_a_webui_extensions_folder(tmp_path):
    extension = fake_webui(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests"], cwd=extension, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.splitlines()[-1]
