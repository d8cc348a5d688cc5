"""`clip-finetune report` writes one self-contained HTML page that a real browser renders: metrics, curves,
the data report, before/after examples and the failure gallery with their pictures."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_MODEL, TINY_TRAINING
from PIL import Image
from search_panel_browser import panel_browser

from adapters.clip_finetune.api import fit
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.data.synthetic import write_dataloop_download

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    data = write_dataloop_download(root / "data", n_train=256, n_validation=64, seed=4)
    run = fit(model=TINY_MODEL, train_data=data, run_name="shown", runs_dir=root / "runs", wait=True,
              **{**TINY_TRAINING, "learning_rate": 2e-3, "num_epochs": 4, "train_batch_size": 32})
    assert run.metrics()["best_epoch"] > 0  # the examples below need a model that changed
    return run.path


def test_the_report_of_a_run_holds_everything_inline(finished_run, capsys) -> None:
    assert main(["report", "shown", "--runs-dir", str(finished_run.parent)]) == 0
    page = (finished_run / "report.html").read_text()
    assert f"wrote {finished_run / 'report.html'}" in capsys.readouterr().out
    assert "Retrieval metrics (validation, the selection set)" in page
    assert "text to image" in page and "recall@5" in page
    assert "so it flatters the model" in page  # the note on 'after' of the selection set
    assert "Training curves" in page and "Data" in page and "Examples" in page
    assert re.search(r"Of 64 validation captions, the described image entered the top 5 for \d+", page)
    # self-contained: every picture is inlined, nothing is fetched
    sources = re.findall(r"<img[^>]* src='([^']*)'", page)
    assert len(sources) > 10 and all(s.startswith("data:image/") for s in sources)
    assert "http://" not in page and "https://" not in page


def test_a_saved_model_folder_reports_without_examples(finished_run, tmp_path) -> None:
    out = tmp_path / "model-report.html"
    assert main(["report", str(finished_run / "model"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "Retrieval metrics (validation, the selection set)" in page and "Examples" not in page


def test_a_folder_that_is_neither_is_refused(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a saved model folder" in capsys.readouterr().err


def test_a_real_browser_renders_the_page_and_its_pictures(finished_run, tmp_path) -> None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    main(["report", str(finished_run)])
    url = (finished_run / "report.html").as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Fine-tuning report" in dom and "recall@5" in dom and "Got worse" in dom
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    # text and tables are grey; the curves and the coloured-shape thumbnails only show if the pictures decoded
    assert (saturation > 100).sum() > 2000


def test_the_failure_gallery_shows_its_queries_and_pictures_in_a_real_browser(finished_run) -> None:
    gallery = json.loads((finished_run / "model" / "failures.json").read_text())
    entries = len(gallery["worse"]) + len(gallery["still_failing"])
    assert entries > 0 and all(len(gallery[key]) <= 20 for key in ("worse", "still_failing"))
    main(["report", str(finished_run)])
    with panel_browser() as browser:  # Playwright driving the system Chromium (skips, saying why, without)
        page = browser.new_page()
        page.goto((finished_run / "report.html").as_uri())
        headings = page.locator("h3").all_inner_texts()
        assert f"Queries that got worse: {gallery['counts']['worse']}" in " ".join(headings)
        assert page.locator(".failure").count() == entries
        first = gallery["worse"][0] if gallery["worse"] else gallery["still_failing"][0]
        assert first["query"] in page.locator(".failure").first.inner_text()
        # every thumbnail (wanted, top-k before, top-k after) decoded from its inlined data: URI
        shown = page.evaluate("""() => [...document.querySelectorAll('.failure img')].map(
            i => [i.complete && i.naturalWidth > 0, i.src.startsWith('data:image/')])""")
        assert len(shown) >= entries * (1 + 2 * gallery["k"]) and all(ok and inline for ok, inline in shown)


def test_a_real_browser_shows_the_retention_table_and_the_alpha_curve(retention_tuned, tmp_path) -> None:
    """Playwright drives Debian's Chromium over the report of a model tuned with a retention set and auto WiSE-FT:
    the table has its rows, and the alpha curve is a decoded picture of its drawn size."""
    assert main(["report", str(retention_tuned.auto), "--out", str(tmp_path / "report.html")]) == 0
    with panel_browser() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 2400})
        page.goto((tmp_path / "report.html").as_uri())
        rows = page.locator("#retention-table tr").all_inner_texts()
        curve = page.eval_on_selector("#alpha-curve", "img => [img.complete, img.naturalWidth, img.naturalHeight]")
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#alpha-curve").screenshot())).convert("RGB")).astype(int)
    assert len(rows) == 1 + 8 and "text_to_image/mrr" in "".join(rows) and "plain fine-tuning" in rows[0]
    assert curve[0] and curve[1] >= 600 and curve[2] >= 300  # 6.5 x 3.6 inches at 110 dpi
    # the plotted lines are coloured (matplotlib's blue, green and the red marker): the picture is not blank
    assert ((shot.max(axis=2) - shot.min(axis=2)) > 100).sum() > 500
