"""The retention check and the WiSE-FT alpha of a run, shown: lines for `clip-finetune train`'s stdout, and the
report's section (the before/after table of the retention set and the alpha curve, drawn with matplotlib as
plots.py draws the training curves). Both read a result as metrics.json holds it (TrainResult.to_dict)."""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..retrieval.formatting import format_table
from ..training.retention import NO_RETENTION, SMALL_RETENTION

RETENTION_METRICS = ("recall@1", "recall@5", "recall@10", "mrr")  # both directions, as the target's table


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _curve(result: Mapping[str, Any]) -> list[dict[str, float | None]]:
    """The alpha curve's points whose alpha and target are numbers (metrics.json may come from anyone)."""
    points = result.get("wise_ft_curve")
    if not isinstance(points, list):
        return []
    return [{"alpha": _number(p.get("alpha")), "target": _number(p.get("target")),
             "retention": _number(p.get("retention")), "retention_se": _number(p.get("retention_se"))} for p in points
            if isinstance(p, dict) and _number(p.get("alpha")) is not None and _number(p.get("target")) is not None]


def alpha_line(result: Mapping[str, Any]) -> str:
    """Which WiSE-FT alpha the saved weights are, and why."""
    alpha, metric = _number(result.get("wise_ft_alpha")), result.get("metric")
    if _curve(result):
        within = "with the retention set within the tolerance of the base" if _dict(result.get("retention")) else \
            "(no retention set: the target alone)"
        return (f"WiSE-FT alpha {alpha:g} (auto: the best {metric} on validation of 11 mixes, {within}; "
                f"the curve is wise_ft_curve in metrics.json)")
    if alpha is not None and alpha < 1:
        return f"WiSE-FT alpha {alpha:g} (configured: wise_ft_alpha)"
    return ""


def change_line(result: Mapping[str, Any]) -> str:
    """How precisely the retention set measured the saved model's change ('' when metrics.json does not say)."""
    retention, metric = _dict(result.get("retention")), result.get("metric")
    se = _number(_dict(retention.get("change_se")).get(metric))
    before, after = (_number(_dict(retention.get(k)).get(metric)) for k in ("before", "after"))
    if se is None or before is None or after is None:
        return ""
    return (f"the saved model's change of {metric} on the retention set, {after - before:+.4f}, is measured to "
            f"±{se:.4f} (one standard error, paired over its queries)")


def retention_text(result: Mapping[str, Any]) -> str:
    """stdout's lines: the retention set before -> after (and plain fine-tuning's), the alpha; or how to add one."""
    retention = _dict(result.get("retention"))
    lines = []
    if retention.get("before") and retention.get("after"):
        lines.append("retention set (what the base model knew), base model -> saved model:\n"
                     + format_table(retention["before"], retention["after"], RETENTION_METRICS))
        metric, plain = result.get("metric"), _dict(retention.get("fine_tuned"))
        if metric in plain:
            lines.append(f"plain fine-tuning (alpha 1) would have scored {metric} {plain[metric]:.4f} on it")
        if line := change_line(result):
            lines.append(line)
    elif not retention:
        lines.append(NO_RETENTION)
    if line := alpha_line(result):
        lines.append(line)
    return "\n".join(lines)


def retention_section(result: Mapping[str, Any]) -> str:
    """The report's HTML: the retention table (before / after / plain fine-tuning) and the alpha curve."""
    if not result:
        return ""
    retention, metric = _dict(result.get("retention")), str(result.get("metric"))
    if retention.get("before") and retention.get("after"):
        table = _table(_dict(retention["before"]), _dict(retention["after"]), _dict(retention.get("fine_tuned")))
    else:
        table = f"<p class='note' id='no-retention'>{html.escape(NO_RETENTION)}</p>"
    parts = ["<h2>Retention (what the base model knew)</h2>", table]
    for line in (change_line(result), alpha_line(result)):
        if line:
            parts.append(f"<p>{html.escape(line)}</p>")
    notes = result.get("notes") if isinstance(result.get("notes"), list) else []
    parts += [f"<p class='note'>{html.escape(str(n))}</p>" for n in notes if str(n).startswith(SMALL_RETENTION)]
    curve = _curve(result)
    if curve:
        with tempfile.TemporaryDirectory() as tmp:
            data = plot_alpha_curve(curve, metric, Path(tmp) / "alpha.png",
                                    _number(result.get("wise_ft_alpha"))).read_bytes()
        uri = f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}"
        parts.append(f"<img id='alpha-curve' alt='WiSE-FT alpha curve' style='max-width:100%' src='{uri}'>")
    return "\n".join(parts)


def _table(before: dict[str, Any], after: dict[str, Any], plain: dict[str, Any]) -> str:
    head = "<tr><th>metric</th><th>base model</th><th>saved model</th><th>change</th>" + (
        "<th>plain fine-tuning</th>" if plain else "") + "</tr>"
    rows = []
    for direction in ("text_to_image", "image_to_text"):
        for name in RETENTION_METRICS:
            key = f"{direction}/{name}"
            b, a, p = (_number(d.get(key)) for d in (before, after, plain))
            if b is None and a is None:
                continue
            change = "" if b is None or a is None else f"{a - b:+.3f}"
            cls = "" if not change else "up" if a > b else "down" if a < b else ""
            cells = [key, _fmt(b), _fmt(a)]
            row = "".join(f"<td{' class=num' if i else ''}>{html.escape(c)}</td>" for i, c in enumerate(cells))
            row += f"<td class='num {cls}'>{change}</td>" + (f"<td class='num'>{_fmt(p)}</td>" if plain else "")
            rows.append(f"<tr>{row}</tr>")
    return f"<table id='retention-table'>{head}{''.join(rows)}</table>"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot_alpha_curve(curve: Sequence[Mapping[str, float | None]], metric: str, path: str | Path,
                     chosen: float | None = None) -> Path:
    """The target metric on validation and on the retention set against the WiSE-FT alpha, the chosen alpha marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    alphas = [p["alpha"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(alphas, [p["target"] for p in curve], marker="o", label=f"validation {metric}")
    if all(p["retention"] is not None for p in curve):  # with one standard error of the change from the base
        errors = [p.get("retention_se") or 0.0 for p in curve]
        ax.errorbar(alphas, [p["retention"] for p in curve], yerr=errors, marker="s", color="tab:green", capsize=3,
                    label=f"retention {metric} (± one standard error of its change)")
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", linestyle="--", label=f"shipped: alpha {chosen:g}")
    ax.set(title="WiSE-FT: alpha x fine-tuned + (1 - alpha) x base", xlabel="alpha (0: base model, 1: fine-tuned)",
           xlim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
