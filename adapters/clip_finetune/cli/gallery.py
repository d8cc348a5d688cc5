"""The failure gallery of `clip-finetune report`: the queries that got worse and those still failing
(failures.json, written by retrieval.failures at the end of a run), each with its wanted images and its top
images before and after, as thumbnails. Every value is escaped and checked for its type: the file may come from
anyone; the thumbnails come from the report's own picture guard (only the run's and its data's images)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from typing import Any

LISTS = (("worse", "Queries that got worse"), ("still_failing", "Queries still failing"))


def _text(value: Any) -> str:
    return html.escape(str(value))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def render_gallery(gallery: Mapping[str, Any], thumbnail: Callable[[Any], str]) -> str:
    """The gallery section; `thumbnail(path)` gives an image's data: URI ('' for one not shown)."""
    if not gallery:
        return ""
    counts = gallery.get("counts") if isinstance(gallery.get("counts"), dict) else {}
    k = _int(gallery.get("k")) or 5
    images = gallery.get("images") if isinstance(gallery.get("images"), dict) else {}
    n = {key: _int(counts.get(key)) or 0 for key in
         ("queries", "worse", "fell_out_of_top_k", "still_failing", "failing_after", "better", "fixed")}
    parts = [f"<h2>Failure gallery (search: text to image)</h2><p>Of {n['queries']} queries, the first wanted "
             f"image ranked lower after fine-tuning for <b>{n['worse']}</b> ({n['fell_out_of_top_k']} of them fell "
             f"out of the top {k}) and higher for {n['better']} ({n['fixed']} of them entered the top {k}); "
             f"<b>{n['still_failing']}</b> were not in the top {k} before and are still not ({n['failing_after']} "
             f"queries in all miss the top {k} after). Green frames mark wanted images.</p>"]
    for key, title in LISTS:
        entries = [e for e in gallery.get(key) or [] if isinstance(e, dict)] if isinstance(
            gallery.get(key), list) else []
        shown = f" (the {len(entries)} worst shown; per_query.json has every query)" if len(entries) < n[key] else ""
        parts.append(f"<h3>{title}: {n[key]}{shown}</h3>")
        parts.append("".join(_entry(e, images, thumbnail) for e in entries) or "<p>none</p>")
    return "".join(parts)


def _entry(entry: Mapping[str, Any], images: Mapping[str, Any], thumbnail: Callable[[Any], str]) -> str:
    relevant = [str(r) for r in entry.get("relevant") or [] if isinstance(r, str | int)] if isinstance(
        entry.get("relevant"), list) else []
    wanted = set(relevant)
    rows = [("wanted", [(r, None) for r in relevant]), ("before", _hits(entry.get("top_before"))),
            ("after", _hits(entry.get("top_after")))]
    shown = "".join(f"<div class='row'><span>{when}</span>{_thumbs(hits, wanted, images, thumbnail)}</div>"
                    for when, hits in rows)
    ranks = f"rank {_text(entry.get('rank_before'))} &rarr; {_text(entry.get('rank_after'))}"
    return (f"<div class='example failure'><b>&ldquo;{_text(entry.get('query', ''))}&rdquo;</b> "
            f"<span class='down'>{ranks}</span>{shown}</div>")


def _hits(top: Any) -> list[tuple[str, float | None]]:
    """[[id, score], ...] as (id, score) pairs; anything else is left out."""
    if not isinstance(top, list):
        return []
    return [(str(t[0]), float(t[1]) if isinstance(t[1], int | float) and not isinstance(t[1], bool) else None)
            for t in top if isinstance(t, list) and len(t) == 2 and isinstance(t[0], str | int)]


def _thumbs(hits: list[tuple[str, float | None]], wanted: set[str], images: Mapping[str, Any],
            thumbnail: Callable[[Any], str]) -> str:
    out = []
    for ident, score in hits:
        title = ident if score is None else f"{ident} ({score:.3f})"
        out.append(f"<img class='t{' hit' if ident in wanted else ''}' title='{_text(title)}' alt='{_text(ident)}' "
                   f"src='{thumbnail(images.get(ident))}'>")
    return "".join(out)
