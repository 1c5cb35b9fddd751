"""Stand-in of modules/scripts_postprocessing.py (v1.10): only what `scripts.load_scripts` needs (Extras tab scripts
are registered into `scripts.postprocessing_scripts_data` but never run)."""


class PostprocessedImage:
    def __init__(self, image):
        self.image = image
        self.info = {}


class ScriptPostprocessing:
    filename = None
    controls = None
    args_from = None
    args_to = None

    order = 1000
    name = None
    group = None

    def ui(self):
        pass

    def process(self, pp: PostprocessedImage, **args):
        pass

    def process_firstpass(self, pp: PostprocessedImage, **args):
        pass

    def image_changed(self):
        pass


class ScriptPostprocessingRunner:
    def __init__(self):
        self.scripts = None
        self.ui_created = False
