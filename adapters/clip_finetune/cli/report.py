"""`clip-finetune report`: one self-contained HTML page (styles and pictures inlined) of a run of the Python
API or of a saved model folder: metrics before and after (headed by the split they were scored on, with the
run's notes), training curves, the data report, the queries whose top results improved or got worse (a run's
examples/, or those `clip-finetune train` wrote into the model folder) and the failure gallery (failures.json)."""

from __future__ import annotations

import base64
import html
import io
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import atomic_write, read_json
from ..retrieval.formatting import DEFAULT_TABLE_METRICS
from ..retrieval.metrics import LOWER_IS_BETTER
from .retention_view import retention_section

REPORT_NAME = "report.html"
SCORED_ON = {"test": "test split, scored once at the end", "selection": "validation, the selection set"}
EXAMPLES_SHOWN = 6  # queries shown in each of "improved" and "got worse"
THUMB = 96
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.up { color: #1a7f37; } .down { color: #c0392b; } .note { background: #fff4e5; padding: .6em 1em; }
.example { margin: .8em 0 1.4em; } .row { display: flex; gap: 4px; align-items: center; margin: 2px 0; }
.row span { width: 52px; font-size: 12px; color: #666; }
img.t { width: 96px; height: 96px; object-fit: cover; border: 3px solid #ddd; } img.hit { border-color: #2e9e44; }
"""


def write_report(source: str | Path, out: str | Path | None = None, runs_dir: str | None = None) -> Path:
    """Write the report of a run folder, a run name or a saved model folder; returns the HTML file."""
    page = _Sources.find(source, runs_dir)
    target = Path(out) if out else page.folder / REPORT_NAME
    text = render(page)
    atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))
    return target


class _Sources:
    """What a report is made of, wherever it lies: metrics, data report, run state, example embeddings."""

    def __init__(self, folder: Path, model: Path, run: Path | None) -> None:
        self.folder, self.model, self.run = folder, model, run

    @staticmethod
    def find(source: str | Path, runs_dir: str | None) -> _Sources:
        path = Path(source).expanduser()
        if not path.exists() and "/" not in str(source):  # a run name
            from ..api.run_folder import runs_root

            path = runs_root(runs_dir) / str(source)
        if (path / "open_clip_config.json").is_file():
            return _Sources(path, path, None)
        if (path / "state.json").is_file():
            return _Sources(path, path / "model", path)
        if (path / "model" / "open_clip_config.json").is_file():  # e.g. the demo's output folder
            return _Sources(path, path / "model", None)
        raise DataError(f"report: {str(source)!r} is neither a saved model folder (open_clip_config.json) nor a run "
                        "folder (state.json) nor a run name; give one of them")

    def json(self, *names: str) -> dict[str, Any]:
        for folder in (self.run, self.model, self.folder):
            for name in names:
                if folder is not None and (folder / name).is_file():
                    data = read_json(folder / name)  # bounded: a damaged file is a DataError naming it
                    if not isinstance(data, dict):
                        raise DataError(f"report: {str(folder / name)!r} is not a JSON object (damaged or written "
                                        "by hand); restore it or delete it")
                    return data
        return {}

    def image_roots(self) -> tuple[list[Path], set[Path]]:
        """The folders (and single files) whose images a report may inline: the run or model folder, and the data
        the run recorded in request.json (a folder, a table's folder, the images fit() listed in its own tables).
        Any other path an example names is refused: a run folder from someone else must not pull your files
        into the page you share."""
        roots, files = [self.folder.resolve(), self.model.resolve()], set()
        request = self.json("request.json") if self.run is not None else {}
        for key in ("train_data", "eval_data", "test_data"):
            value = request.get(key)
            if not isinstance(value, str) or not value or "\x00" in value:
                continue
            path = Path(value).resolve()
            roots.append(path if path.is_dir() else path.parent)
            if path.is_file() and self.run is not None and self.run.resolve() in path.parents:
                files |= _table_images(path)  # fit()'s in-memory pairs: the image paths the caller gave
        return roots, files


def _table_images(table: Path) -> set[Path]:
    from ..data.tables import read_table

    try:
        return {Path(p.image).resolve() for p in read_table(table)}
    except DataError:  # a damaged table allows nothing more
        return set()


def _text(value: Any) -> str:
    """Any value of a run's files as HTML text: escaped, whatever its type (the files may come from anyone)."""
    return html.escape(str(value))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def render(page: _Sources) -> str:
    result = page.json("result.json", "metrics.json")
    state = page.json("state.json")
    parts = [f"<h1>Fine-tuning report</h1><p>{html.escape(str(page.folder.resolve()))} &middot; "
             f"{time.strftime('%Y-%m-%d %H:%M')}</p>", _summary(result, state)]
    parts.append(_metrics(result))
    parts.append(retention_section(result))  # the retention set before/after and the WiSE-FT alpha curve
    parts.append(_curves(result))
    parts.append(_data_report(page.json("data_report.json")))
    parts.append(_examples(page))
    parts.append(_failures(page))
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Fine-tuning report</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _summary(result: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    if not result:
        status, details = _text(state.get("status", "unknown")), _text(state.get("details", ""))
        return f"<p class='note'>No metrics yet: the run is {status} ({details}).</p>"
    rows = [("best epoch", result.get("best_epoch")), ("selection metric", result.get("metric")),
            ("epochs trained", len(_history(result))), ("WiSE-FT alpha", result.get("wise_ft_alpha", 1.0)),
            ("training images that could not be decoded", result.get("skipped_images", 0))]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{_text(v)}</td></tr>" for k, v in rows if v is not None)
    note = f"<p class='note'>{_text(result['note'])}</p>" if result.get("note") else ""
    return f"<h2>Summary</h2><table>{table}</table>{note}"


def _metrics(result: Mapping[str, Any]) -> str:
    before, after = (v if isinstance(v, dict) else {} for v in (result.get("before"), result.get("after")))
    if not before and not after:
        return "<h2>Retrieval metrics</h2><p>No validation data: no metrics.</p>"
    rows = []
    for direction in ("text_to_image", "image_to_text"):
        rows.append(f"<tr><th colspan='4'>{direction.replace('_', ' ')}</th></tr>")
        for name in DEFAULT_TABLE_METRICS:
            key = f"{direction}/{name}"
            if key in before or key in after:
                rows.append(_metric_row(name, _number(before.get(key)), _number(after.get(key))))
    head = "<tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"
    # the split 'after' was scored on (training.loop._finish): a test split chose nothing; the selection set
    # also picked the best epoch, so its 'after' flatters the model, as the run's notes say below the table
    where = SCORED_ON.get(str(result.get("scored_on")), "validation")
    notes = "".join(f"<p class='note'>{html.escape(str(n))}</p>" for n in result.get("notes") or []
                    if "'after'" in str(n) or "held out" in str(n))
    return f"<h2>Retrieval metrics ({where})</h2><table>{head}{''.join(rows)}</table>{notes}"


def _metric_row(name: str, before: float | None, after: float | None) -> str:
    rank = name in LOWER_IS_BETTER

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.{1 if rank else 3}f}"

    change = "" if before is None or after is None else f"{after - before:+.{1 if rank else 3}f}"
    better = change and ((after < before) if rank else (after > before))
    worse = change and ((after > before) if rank else (after < before))
    cls = "up" if better else "down" if worse else ""
    return (f"<tr><td>{html.escape(name)}</td><td class='num'>{fmt(before)}</td><td class='num'>{fmt(after)}</td>"
            f"<td class='num {cls}'>{change}</td></tr>")


def _history(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-epoch records, when each is a record with the numbers the curves need (else none: no curves)."""
    history = result.get("history")
    keys = ("epoch", "train_loss", "lr")
    if not isinstance(history, list) or not all(
            isinstance(h, dict) and all(_number(h.get(k)) is not None for k in keys) for h in history):
        return []
    # a curve is drawn only from a key every epoch holds as a number
    common = set.intersection(*({k for k, v in h.items() if _number(v) is not None} for h in history)) \
        if history else set()
    return [{k: v for k, v in h.items() if k in common} for h in history]


def _curves(result: Mapping[str, Any]) -> str:
    history = _history(result)
    if not history:
        return ""
    from .plots import plot_training_curves

    before = {k: v for k, v in result["before"].items() if _number(v) is not None} if isinstance(
        result.get("before"), dict) else None
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training_curves(history, Path(tmp) / "curves.png", before=before)
        data = png.read_bytes()
    return f"<h2>Training curves</h2><img alt='training curves' style='max-width:100%' src='{_data_uri(data, 'png')}'>"


def _data_report(report: Mapping[str, Any]) -> str:
    if not report:
        return ""
    rows = []
    for split, r in report.items():
        r = r if isinstance(r, dict) else {}
        skipped = {k: n for k, n in (r.get("skipped") or {}).items() if _number(n) is not None} if isinstance(
            r.get("skipped"), dict) else {}
        examples = r.get("examples") if isinstance(r.get("examples"), dict) else {}
        reasons = "; ".join(f"{_text(n)} {_text(reason)} (e.g. {_examples_of(examples.get(reason))})"
                            for reason, n in skipped.items()) or "none"
        rows.append(f"<tr><td>{_text(split)}</td><td class='num'>{_text(r.get('used', 0))}</td>"
                    f"<td class='num'>{_text(sum(skipped.values()))}</td><td>{reasons}</td></tr>")
    head = "<tr><th>split</th><th>pairs used</th><th>skipped</th><th>why</th></tr>"
    return f"<h2>Data</h2><table>{head}{''.join(rows)}</table>"


def _examples_of(examples: Any) -> str:
    return _text(", ".join(str(e) for e in examples[:3])) if isinstance(examples, list) else ""


def _examples(page: _Sources) -> str:
    from ..api.run import read_examples
    from ..api.run_folder import EXAMPLES_DIR
    from ..errors import ClipFinetuneError

    folder = (page.run or page.model) / EXAMPLES_DIR  # a run's, or those `clip-finetune train` saved
    if not (folder / "after.npz").is_file():
        return ""
    try:
        examples = read_examples(folder, k=5)
    except ClipFinetuneError as e:  # damaged example files: the rest of the report still stands
        return f"<h2>Examples</h2><p class='note'>No examples: {_text(e)}</p>"
    improved = [e for e in examples if e.hit_after and not e.hit_before][:EXAMPLES_SHOWN]
    worse = [e for e in examples if e.hit_before and not e.hit_after][:EXAMPLES_SHOWN]
    counts = (f"<p>Of {len(examples)} validation captions, the described image entered the top 5 for "
              f"{sum(e.hit_after and not e.hit_before for e in examples)} and left it for "
              f"{sum(e.hit_before and not e.hit_after for e in examples)}.</p>")
    pictures = _Pictures(*page.image_roots())
    lists = "<h3>Improved</h3>" + _example_list(improved, pictures) + "<h3>Got worse</h3>" + _example_list(
        worse, pictures)
    refused = ""
    if pictures.refused:
        refused = (f"<p class='note'>{len(pictures.refused)} pictures not shown: they lie outside the run folder and "
                   f"the data it recorded (e.g. {_text(sorted(pictures.refused)[0])}).</p>")
    return "<h2>Examples</h2>" + counts + refused + lists


def _failures(page: _Sources) -> str:
    """The failure gallery (failures.json beside the model: gallery.py renders it)."""
    from ..retrieval.failures import FAILURES_NAME
    from .gallery import render_gallery

    try:
        gallery = page.json(FAILURES_NAME)
    except DataError as e:  # a damaged gallery: the rest of the report still stands
        return f"<h2>Failure gallery</h2><p class='note'>No gallery: {_text(e)}</p>"
    pictures = _Pictures(*page.image_roots())
    body = render_gallery(gallery, pictures.uri)
    if pictures.refused:
        body += (f"<p class='note'>{len(pictures.refused)} pictures not shown: they lie outside the run folder and "
                 f"the data it recorded (e.g. {_text(sorted(pictures.refused)[0])}).</p>")
    return body


class _Pictures:
    """Thumbnails of the images inside the allowed roots; the paths outside them are refused and remembered."""

    def __init__(self, roots: Sequence[Path], files: set[Path]) -> None:
        self.roots, self.files, self.refused = roots, files, set()

    def uri(self, path: Any) -> str:
        if not isinstance(path, str) or "\x00" in path:
            return ""
        real = Path(path).resolve()  # symlinks followed: a link inside the run to /home/... is outside
        if real not in self.files and not any(real.is_relative_to(root) for root in self.roots):
            self.refused.add(path)
            return ""
        return _thumbnail(str(real))


def _example_list(examples: Sequence[Any], pictures: _Pictures) -> str:
    if not examples:
        return "<p>none</p>"
    blocks = []
    for e in examples:
        rows = "".join(f"<div class='row'><span>{when}</span>{_thumbs(hits, e.image, pictures)}</div>"
                       for when, hits in (("before", e.before), ("after", e.after)))
        blocks.append(f"<div class='example'><b>&ldquo;{_text(e.query)}&rdquo;</b>{rows}</div>")
    return "".join(blocks)


def _thumbs(hits: Sequence[tuple[str, float]], target: str, pictures: _Pictures) -> str:
    return "".join(f"<img class='t{' hit' if path == target else ''}' title='{_text(Path(path).name)} "
                   f"({score:.3f})' alt='{_text(Path(path).name)}' src='{pictures.uri(path)}'>"
                   for path, score in hits)


def _thumbnail(path: str) -> str:
    from ..data.images import load_image

    try:
        image = load_image(path)
    except DataError:
        return ""
    image.thumbnail((THUMB * 2, THUMB * 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "jpeg")


def _data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
