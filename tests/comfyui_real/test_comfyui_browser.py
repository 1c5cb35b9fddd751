"""The node pack in ComfyUI's web page: headless Chromium (/usr/bin/chromium) driven by Playwright's sync API against
conftest.py's `comfyui`. Each example workflow (UI format) loads as a user's drag and drop loads it
(`app.loadGraphData`), with every node type known and no node in error, and the frontend turns it into the same
prompt as its API-format file; the SD 1.5 block-average example, with the tier's checkpoints chosen and a small size,
is queued from the page and shows its image. Screenshots go to the session's `screenshots` folder (named at the end
of the run).

The README's picture (docs/images/comfyui-workflow.png) is the SABW example as loaded here: written to the
screenshots folder on every run, and copied into docs/images/ when AFA_COMFYUI_README_SCREENSHOT=1.

Opt-in: COMFYUI_DIR=/path/to/ComfyUI make test-comfyui (installs requirements/webui-real.txt).
"""

import os
import shutil
from pathlib import Path

import pytest

if not os.environ.get("COMFYUI_DIR"):
    pytest.skip("real-ComfyUI tier: set COMFYUI_DIR to a ComfyUI checkout with its venv at $COMFYUI_DIR/venv and "
                "run `COMFYUI_DIR=/path/to/ComfyUI make test-comfyui`", allow_module_level=True)

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"the browser tests need Chromium at {CHROMIUM}: apt-get install chromium", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: "
                               "pip install -r requirements/webui-real.txt (make test-comfyui does)")

from . import comfyui_workflows as workflows  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO / "docs" / "images" / "comfyui-workflow.png"
README_SCREENSHOT_VARIABLE = "AFA_COMFYUI_README_SCREENSHOT"
README_EXAMPLE = "sd15-two-members-sabw"
QUEUED_EXAMPLE = "sd15-three-members-block-average"
VIEWPORT = {"width": 1600, "height": 900}

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 # nothing but loopback: the page's calls to api.comfy.org fail at once instead of leaving the machine
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
TIMEOUT_MS = 120_000
GENERATION_TIMEOUT_MS = 900_000
POLLING_MS = 250  # the default (requestAnimationFrame) polling never fires: the software-rendered canvas is too slow

# Uncaught JavaScript errors of ComfyUI's frontend itself (1.27.10), seen on a fresh user directory with no node pack
# installed: the settings store reads a user that is not there yet.
FRONTEND_OWN_JS_ERRORS = ("Cannot read properties of undefined (reading 'id')",)

# The node definitions are registered and the start-up workflow (ComfyUI's default graph) is loaded.
APP_READY_JS = """() => window.app && window.app.graph && window.app.extensionManager && window.LiteGraph
    && LiteGraph.registered_node_types['AFAEnsemble'] && app.graph._nodes.length > 0"""

# Loads a UI-format workflow as drag and drop does; returns what a user would see go wrong, and the frontend's prompt.
LOAD_JS = """async (workflow) => {
    document.querySelectorAll('.p-dialog-close-button').forEach(button => button.click());
    await app.loadGraphData(workflow);
    await new Promise(resolve => setTimeout(resolve, 500));
    const nodes = app.graph._nodes.map(node => ({
        id: node.id, type: node.type, known: !!LiteGraph.registered_node_types[node.type],
        has_errors: !!node.has_errors,
        links_in: (node.inputs || []).filter(input => input.link != null).length}));
    const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(dialog => dialog.innerText.slice(0, 500));
    const prompt = (await app.graphToPrompt()).output;
    return {nodes, dialogs, prompt};
}"""

# Sets widgets by node type and widget name (values: {type: {widget: value}}; ckpt_name through a name map).
SET_WIDGETS_JS = """([values, names]) => {
    for (const node of app.graph._nodes) {
        for (const widget of node.widgets || []) {
            if (widget.name === 'ckpt_name' && names[widget.value]) widget.value = names[widget.value];
            const value = (values[node.type] || {})[widget.name];
            if (value !== undefined) widget.value = value;
        }
    }
    app.graph.setDirtyCanvas(true, true);
}"""

QUEUED_STATE_JS = """() => {
    const saved = app.graph._nodes.filter(node => node.type === 'SaveImage')
        .map(node => (node.imgs || []).filter(image => image.complete).map(image => image.naturalWidth));
    const nodeErrors = app.lastNodeErrors && Object.keys(app.lastNodeErrors).length ? app.lastNodeErrors : null;
    return {saved, nodeErrors, executionError: app.lastExecutionError || null};
}"""

# Fits every node into the canvas with a small margin (ComfyUI's own Fit View leaves wide margins).
FIT_JS = """(margin) => {
    const canvas = app.canvas, title = LiteGraph.NODE_TITLE_HEIGHT;
    const boxes = app.graph._nodes.map(node => [node.pos[0], node.pos[1] - title,
                                                node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
    const [left, top] = [Math.min(...boxes.map(b => b[0])), Math.min(...boxes.map(b => b[1]))];
    const [right, bottom] = [Math.max(...boxes.map(b => b[2])), Math.max(...boxes.map(b => b[3]))];
    const width = app.canvasEl.clientWidth, height = app.canvasEl.clientHeight;
    const scale = Math.min((width - 2 * margin) / (right - left), (height - 2 * margin) / (bottom - top));
    canvas.ds.scale = scale;
    canvas.ds.offset = [(width / scale - (right - left)) / 2 - left, (height / scale - (bottom - top)) / 2 - top];
    canvas.setDirty(true, true);
    const onScreen = boxes.map(b => [...app.canvasPosToClientPos([b[0], b[1]]),
                                     ...app.canvasPosToClientPos([b[2], b[3]])]);
    return {scale, onScreen, width, height};
}"""


# -- the page ---------------------------------------------------------------------------------------------------------

class ComfyPage:
    """ComfyUI's page, recording what the page would only show in passing: uncaught JavaScript errors and server
    errors (HTTP 5xx) of ComfyUI's routes."""

    def __init__(self, page, url: str, screenshots: Path):
        self.page, self.url, self.screenshots = page, url, screenshots
        self.js_errors: list[str] = []
        self.http_errors: list[str] = []
        page.on("pageerror", self._js_error)
        page.on("response", self._response)

    def _js_error(self, error) -> None:
        if error.message not in FRONTEND_OWN_JS_ERRORS:
            self.js_errors.append(f"{error.message}\n{(error.stack or '')[:800]}")

    def _response(self, response) -> None:
        if response.status >= 500 and response.url.startswith(self.url):
            self.http_errors.append(f"{response.status} {response.request.method} {response.url}")

    def open(self) -> None:
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        self.page.wait_for_function(APP_READY_JS, polling=POLLING_MS, timeout=TIMEOUT_MS)

    def assert_no_errors(self, when: str) -> None:
        assert not self.js_errors and not self.http_errors, \
            f"{when}: JavaScript errors {self.js_errors}, HTTP errors {self.http_errors}"

    def load(self, workflow: dict) -> dict:
        return self.page.evaluate(LOAD_JS, workflow)

    def set_widgets(self, values: dict, names: dict | None = None) -> None:
        self.page.evaluate(SET_WIDGETS_JS, [values, names or {}])

    def settings(self, values: dict) -> None:
        for key, value in values.items():
            self.page.evaluate("([key, value]) => app.extensionManager.setting.set(key, value)", [key, value])

    def fit(self, margin: int = 16) -> dict:
        """Zooms and pans so that every node is in view; returns the scale and the nodes' boxes on screen."""
        return self.page.evaluate(FIT_JS, margin)

    def shot(self, name: str, fit: bool = True) -> Path:
        if fit:
            self.fit()
        self.page.wait_for_timeout(1500)  # the canvas repaints at a few frames per second here
        path = self.screenshots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture(scope="module")
def page(comfyui, screenshots, tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            comfy_page = ComfyPage(context.new_page(), comfyui.url + "/", screenshots)
            comfy_page.open()
            comfy_page.assert_no_errors("opening ComfyUI's page")
            yield comfy_page
        finally:
            context.close()


def api_view(prompt: dict) -> dict:
    """A prompt's nodes as (class_type, inputs): what runs (titles and other _meta left out)."""
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


def assert_loaded_cleanly(state: dict, name: str) -> None:
    unknown = [f"{node['id']} {node['type']}" for node in state["nodes"] if not node["known"]]
    in_error = [f"{node['id']} {node['type']}" for node in state["nodes"] if node["has_errors"]]
    assert not unknown, f"{name}: node types ComfyUI does not know: {unknown}"
    assert not in_error, f"{name}: nodes in error (red) after loading: {in_error}"
    assert not state["dialogs"], f"{name}: dialogs after loading: {state['dialogs']}"


# -- tests ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", workflows.example_names())
def test_example_workflow_loads_with_every_node_known(page, name):
    """Each examples/comfyui/<name>.json loads with no missing node type, no node in error and every link in place,
    and the frontend makes exactly <name>.api.json of it (so the two files describe one graph). The SDXL example
    loads here only: the tier cannot run SDXL (test_comfyui_api.py says why)."""
    workflow = workflows.load_example(name, api=False)
    state = page.load(workflow)
    page.shot(f"loaded-{name}")
    assert_loaded_cleanly(state, name)
    assert len(state["nodes"]) == len(workflow["nodes"])
    assert sum(node["links_in"] for node in state["nodes"]) == len(workflow["links"])
    assert api_view(state["prompt"]) == api_view(workflows.load_example(name)), \
        f"the frontend's prompt from {name}.json differs from {name}.api.json"
    page.assert_no_errors(f"loading {name}")


def test_queue_the_block_average_example_from_the_page(page):
    """The three-member block-average example with the tier's checkpoints chosen in its loaders, 64 px and 2
    steps, queued from the page (app.queuePrompt, as the Run button does): no node errors, and its Save Image node
    shows the 64 px image."""
    state = page.load(workflows.load_example(QUEUED_EXAMPLE, api=False))
    assert_loaded_cleanly(state, QUEUED_EXAMPLE)
    page.set_widgets({"EmptyLatentImage": {"width": workflows.SIZE, "height": workflows.SIZE},
                      "KSampler": {"steps": workflows.STEPS}}, workflows.EXAMPLE_FILES)
    page.page.evaluate("() => app.queuePrompt(0, 1)")
    page.page.wait_for_function(f"() => {{ const s = ({QUEUED_STATE_JS})(); "
                                "return s.saved.some(widths => widths.length) || s.nodeErrors || s.executionError; }",
                                polling=POLLING_MS, timeout=GENERATION_TIMEOUT_MS)
    result = page.page.evaluate(QUEUED_STATE_JS)
    page.shot(f"queued-{QUEUED_EXAMPLE}")
    assert result["nodeErrors"] is None, result
    assert result["executionError"] is None, result
    assert result["saved"] == [[workflows.SIZE]], result
    page.assert_no_errors(f"queueing {QUEUED_EXAMPLE}")


def test_readme_picture_of_the_sabw_example(page):
    """The two-member SABW example as a user loads it, every node on screen at a readable zoom, nothing but the
    graph in view: the README's picture."""
    state = page.load(workflows.load_example(README_EXAMPLE, api=False))
    assert_loaded_cleanly(state, README_EXAMPLE)
    page.settings({"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False,
                   "Comfy.NodeBadge.NodeSourceBadgeMode": "None",  # the badges would name this tier's folder
                   "LiteGraph.Canvas.MinFontSizeForLOD": 0})  # 0: nodes drawn in full at any zoom
    page.page.evaluate("() => { app.extensionManager.focusMode = true; }")  # the canvas alone, no menus
    page.page.wait_for_timeout(1000)
    try:
        fit = page.fit()
        assert fit["scale"] >= 0.7, f"the graph fits only at {fit['scale']:.2f}x: too small to read"
        outside = [box for box in fit["onScreen"]
                   if box[0] < 0 or box[1] < 0 or box[2] > fit["width"] or box[3] > fit["height"]]
        assert not outside, f"nodes outside the view: {outside}"
        path = page.shot("readme-comfyui-workflow", fit=False)
    finally:
        page.page.evaluate("() => { app.extensionManager.focusMode = false; }")
    if os.environ.get(README_SCREENSHOT_VARIABLE) == "1":
        shutil.copyfile(path, README_SCREENSHOT)
    page.assert_no_errors("the README picture")
