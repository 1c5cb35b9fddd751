"""Where the trainer runs: inside a WebUI's `extensions/` folder, or standalone.

Inside a WebUI the trainer uses the WebUI's own copy of ldm (A1111 vendors Stability-AI's stablediffusion repository
as `repositories/stable-diffusion-stability-ai`), so the members are built from the same model definitions the WebUI
samples with, and writes weights into the WebUI's `models/AFA/`. Standalone, the installed `ldm` package is used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

LDM_REPOSITORY = Path("repositories") / "stable-diffusion-stability-ai"


@dataclass(frozen=True)
class WebUI:
    root: Path  # the WebUI's data folder, which holds extensions/ and models/

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def ldm_dir(self) -> Path:
        return self.root / LDM_REPOSITORY


def find_webui(extension_root: Path) -> WebUI | None:
    """The WebUI this extension is installed in (`<webui>/extensions/<name>/`), or None."""
    extension_root = extension_root.resolve()
    if extension_root.parent.name != "extensions":
        return None
    root = extension_root.parent.parent
    return WebUI(root) if (root / "models").is_dir() or (root / LDM_REPOSITORY).is_dir() else None


def use_webui_ldm(webui: WebUI | None) -> bool:
    """Puts the WebUI's vendored ldm first on sys.path (call before anything imports ldm). True when it did."""
    if webui is None or not (webui.ldm_dir / "ldm").is_dir():
        return False
    if "ldm" in sys.modules:
        raise RuntimeError("ldm was imported before use_webui_ldm(); the WebUI's copy could not take effect")
    sys.path.insert(0, str(webui.ldm_dir))
    return True
