"""Where this extension sits: in a WebUI's `extensions/` folder, or on its own.

A1111 vendors Stability-AI's stablediffusion repository (the `ldm` package) as
`<webui>/repositories/stable-diffusion-stability-ai` and puts it on `sys.path` itself; the WebUI's venv has no `ldm`
package. So outside the WebUI's process (`python -m afa`, `python training/train.py`, the test suite run from
`<webui>/extensions/<this extension>`), `ldm` is found only if someone puts that folder on the path: `use_webui_ldm()`
does, before `afa` imports ldm, so the members are built from the same model definitions the WebUI samples with.
Standalone, the installed `ldm` package (stable-diffusion-sdkit) is used. This module imports nothing of the WebUI.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

LDM_REPOSITORY = Path("repositories") / "stable-diffusion-stability-ai"
EXTENSION_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WebUI:
    root: Path  # the WebUI's folder, which holds extensions/, models/ and repositories/

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def ldm_dir(self) -> Path:
        return self.root / LDM_REPOSITORY


def find_webui(extension_root: Path = EXTENSION_ROOT) -> WebUI | None:
    """The WebUI this extension is installed in (`<webui>/extensions/<name>/`), or None."""
    extension_root = Path(extension_root).resolve()
    if extension_root.parent.name != "extensions":
        return None
    root = extension_root.parent.parent
    return WebUI(root) if (root / "models").is_dir() or (root / LDM_REPOSITORY).is_dir() else None


def use_webui_ldm(webui: WebUI | None = None) -> bool:
    """Puts the WebUI's vendored ldm first on sys.path, unless ldm is already imported (inside the WebUI's process,
    or a caller that chose before). True when it did."""
    webui = webui or find_webui()
    if "ldm" in sys.modules or webui is None or not (webui.ldm_dir / "ldm").is_dir():
        return False
    if str(webui.ldm_dir) not in sys.path:
        sys.path.insert(0, str(webui.ldm_dir))
    return True
