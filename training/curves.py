"""A run's history as text and as a picture: the training loss and the held-out validation errors from the run's
`log.jsonl` (train.py's RunLog), for hosts that show them (the ComfyUI training node). PIL only, no plotting
library (ComfyUI does not ship one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from afa.comparison import compare_rows

# Line colours of the validation curves, in the order of the models in the first validation.
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def read_run_log(run_dir: str | Path, up_to_step: int | None = None) -> tuple[list, list]:
    """(losses [[step, loss], ...], validations [{"step", "errors": {model: MSE}}, ...]) of a run, every session of
    it (a resumed run appends to the same log), the last record of each step, up to `up_to_step`."""
    losses, validations = {}, {}
    try:
        lines = (Path(run_dir) / "log.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step", 0)
        if up_to_step is not None and step > up_to_step:
            continue
        if "loss" in record:
            losses[step] = record["loss"]
        if "validation" in record:
            validations[step] = record["validation"]
    return ([[step, loss] for step, loss in sorted(losses.items())],
            [{"step": step, "errors": errors} for step, errors in sorted(validations.items())])


def validation_table(validations: Sequence[dict], header: str = "", footer: str = "") -> str:
    """The last validation as a table (model, held-out denoising MSE, its change against the best member and against
    the best merge, afa.comparison; lower is better), with the first validation's values beside it when there were
    several."""
    lines = [header] if header else []
    if not validations:
        lines.append("no validation (no images held out: raise the held-out share)")
    else:
        last, first = validations[-1], validations[0]
        lines.append(f"held-out denoising MSE at step {last['step']} (lower is better):")
        rows, _, best_merge = compare_rows(last["errors"])
        width = max(len(row.model) for row in rows)
        earlier = len(validations) > 1
        lines.append(f"  {'model'.ljust(width)}  {'MSE':>9}" + (f"  {'step ' + str(first['step']):>9}" if earlier
                                                                  else "") + f"  {'vs best member':>14}"
                     + (f"  {'vs best merge':>13}" if best_merge else ""))
        for row in rows:
            line = f"  {row.model.ljust(width)}  {row.error:9.5f}"
            if earlier:
                before = first["errors"].get(row.model)
                line += f"  {before:9.5f}" if before is not None else f"  {'':9}"
            line += f"  {row.vs_best_member:>14}" + (f"  {row.vs_best_merge:>13}" if best_merge else "")
            lines.append(line.rstrip())
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def render_training_curves(losses: Sequence[Sequence[float]], validations: Sequence[dict],
                           title: str = "AFA training", size: tuple[int, int] = (768, 512)) -> Image.Image:
    """Two panels: the training loss per step (grey) with its running mean (black), and each model's held-out
    error per validation (one colour per model, legend below). Returns an RGB image."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((10, 6), title, fill="black", font=font)
    names = list(validations[0]["errors"]) if validations else []
    for validation in validations[1:]:
        names += [name for name in validation["errors"] if name not in names]
    legend_rows = (len(names) + 2) // 3
    panel_bottom = height - 24 - 14 * legend_rows
    middle = width // 2
    _panel(draw, font, (50, 28, middle - 10, panel_bottom), "training loss",
           [(list(_xy(losses)), (170, 170, 170))] + [(list(_running_mean(losses)), (0, 0, 0))])
    curves = [([(v["step"], v["errors"][name]) for v in validations if name in v["errors"]],
               COLOURS[index % len(COLOURS)]) for index, name in enumerate(names)]
    _panel(draw, font, (middle + 50, 28, width - 10, panel_bottom), "held-out MSE", curves, markers=True)
    for index, name in enumerate(names):
        x = 50 + (index % 3) * (width - 60) // 3
        y = panel_bottom + 20 + 14 * (index // 3)
        draw.rectangle((x, y + 3, x + 14, y + 9), fill=COLOURS[index % len(COLOURS)])
        draw.text((x + 20, y), name[:40], fill="black", font=font)
    return image


def _xy(points):
    return [(float(step), float(value)) for step, value in points]


def _running_mean(points, window: int = 20):
    values, out = [], []
    for step, value in points:
        values.append(float(value))
        recent = values[-window:]
        out.append((float(step), sum(recent) / len(recent)))
    return out


def _panel(draw, font, box, label, curves, markers=False):
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 4, top + 2), label, fill="black", font=font)
    points = [point for curve, _ in curves for point in curve]
    if not points:
        draw.text((left + 10, (top + bottom) // 2), "no data yet", fill="black", font=font)
        return
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_high == y_low:
        y_low, y_high = y_low - abs(y_low) * 0.1 - 1e-6, y_high + abs(y_high) * 0.1 + 1e-6
    inner = (left + 4, top + 16, right - 4, bottom - 4)

    def to_pixel(point):
        x = inner[0] + (point[0] - x_low) / (x_high - x_low) * (inner[2] - inner[0])
        y = inner[3] - (point[1] - y_low) / (y_high - y_low) * (inner[3] - inner[1])
        return x, y

    for curve, colour in curves:
        pixels = [to_pixel(point) for point in curve]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        if markers or len(pixels) == 1:
            for x, y in pixels:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    draw.text((left - 46, top + 12), f"{y_high:.4g}", fill="black", font=font)
    draw.text((left - 46, bottom - 12), f"{y_low:.4g}", fill="black", font=font)
    draw.text((left, bottom + 2), f"step {x_low:g}", fill="black", font=font)
    draw.text((right - 60, bottom + 2), f"step {x_high:g}", fill="black", font=font)
