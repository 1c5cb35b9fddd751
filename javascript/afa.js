// AFA ensemble: hover hints for the accordion's controls, in A1111's `titles` convention (javascript/hints.js:
// the WebUI shows titles[text] as the tooltip of a label, button or dropdown option whose text is `text`).
// The hints live inside this function (the only global they touch is the WebUI's own `titles`); the training tab's
// functions below are globals, as `_js` handlers must be.
(function() {
    const afaTitles = {
        "AFA ensemble": "Run several checkpoints together: every UNet block of every member runs, and the members' features are mixed after each block (Adaptive Feature Aggregation). The loaded checkpoint provides the text encoder, VAE and sampler.",
        "Ensemble members": "2 to 6 checkpoints with the loaded checkpoint's architecture. The loaded checkpoint is reused when it is one of them; each other member takes its UNet's size in memory (1.72 GB for SD 1.5 in fp16).",
        "SABW weights": "A trained aggregator from the weights folder (models/AFA or --afa-dir). It was trained for specific members: choosing it fills them in. None: no learned weights (Block average or Noise average).",
        "Ensemble mode": "SABW: learned per-pixel weights at every block. Block average: equal weights at every block. Noise average: members run separately and their predictions are averaged.",
        "SABW": "Learned, per-pixel, per-block weights from the chosen weights file (a file trained for the last block only runs that way, and the infotext says 'SABW (last block)').",
        "Block average": "Every member gets the same weight after every block; needs no weights file.",
        "Noise average": "Members run independently; only their noise predictions are averaged; needs no weights file.",
        "Show aggregation maps": "Adds one image per generated image to the gallery: for a few blocks and steps, each pixel in the colour of the member that drives it (Settings > AFA Ensemble chooses which steps).",
    };

    function afaAddTitles() {
        if (typeof titles === "object" && titles !== null) {
            Object.assign(titles, afaTitles);
        }
    }

    afaAddTitles();
    if (typeof onUiLoaded === "function") {
        onUiLoaded(afaAddTitles);
    }
})();

// The AFA Training tab's Start and Resume buttons (`_js` of their click events), as A1111's Train tab starts a
// training (javascript/textualInversion.js): a task id for the run, and the WebUI's progress bar (step, ETA) polling
// /internal/progress for it until the run ends. The Python handler receives the id as its first argument.
function afa_start_training() {
    var id = randomId();
    var container = gradioApp().getElementById("afa_train_progress");
    if (container) {
        requestProgress(id, container, null, function() {});
    }
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

// The AFA Training tab's right column follows the run: every 2 s while the tab is on screen, its refresh button is
// clicked, which reads the run's state into a hidden ticker; the column is redrawn when that changes
// (afa/webui/training_ui.py). Nothing is sent while another tab is shown or the page is in the background.
var AFA_TRAINING_POLL_MS = 2000;
if (typeof onUiLoaded === "function") {
    onUiLoaded(function() {
        setInterval(function() {
            var tab = gradioApp().getElementById("tab_afa_training");
            var button = gradioApp().getElementById("afa_train_poll");
            if (tab && button && tab.offsetParent !== null && !document.hidden) {
                button.click();
            }
        }, AFA_TRAINING_POLL_MS);
    });
}
