"""Draw assets/pipeline.png from the pipeline template itself, so the picture cannot drift from the JSON.

    python docs/make_pipeline_diagram.py [--template PATH] [--out PATH]

Nodes sit where the template's metadata.position puts them; solid arrows are connections (labelled with
the ports they join), dashed lines bind pipeline variables to the ports and nodes that read or set them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "pipeline_templates" / "clip-finetune-and-embed" / "dataloop.json"
OUT = ROOT / "assets" / "pipeline.png"

NODE_W, NODE_H = 2.9, 1.05
VAR_W, VAR_H = 2.6, 0.62
SCALE_X, SCALE_Y = 300.0 / 5.0, 200.0 / 2.6  # template position units per drawing unit
COLORS = {"custom": "#f4d58d", "ml": "#9ecae1", "updateVariable": "#c7e9c0", "storage": "#dadaeb"}
VAR_COLOR = {"Dataset": "#fdd0a2", "Model": "#bcbddc", "Json": "#e5e5e5"}
SUBTITLE = {
    "train": "ml · train_model (GPU)",
    "evaluate": "ml · evaluate_model",
    "embed_dataset": "custom · clip-finetune app",
    "promote_if_better": "custom · clip-finetune app",
    "create_new_model": "custom · active-learning app",
    "update_variable": "updateVariable",
}


def _center(node: dict[str, Any], origin: tuple[float, float]) -> tuple[float, float]:
    pos = node["metadata"]["position"]
    return (pos["x"] - origin[0]) / SCALE_X, -(pos["y"] - origin[1]) / SCALE_Y


def _box(ax: plt.Axes, xy: tuple[float, float], w: float, h: float, color: str, lw: float = 1.4) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (xy[0] - w / 2, xy[1] - h / 2),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            fc=color,
            ec="#333333",
            lw=lw,
            zorder=3,
        )
    )


def _node_uses(node: dict[str, Any]) -> list[str]:
    """Variables a node reads (input ports, variableModel) or sets (updateVariable ports)."""
    names = [p["variableName"] for p in node["inputs"] if "variableName" in p]
    if "variableModel" in node["metadata"]:
        names.append(node["metadata"]["variableModel"])
    if node["type"] == "updateVariable":
        names += [p["name"] for p in node["outputs"]]
    return list(dict.fromkeys(names))


def _defaults_label(node: dict[str, Any]) -> str:
    lines = []
    for port in node["inputs"]:
        if "defaultValue" in port:
            clauses = json.dumps(port["defaultValue"])
            tag = next((t for t in ("train", "validation", "test") if f"tags.{t}" in clauses), None)
            lines.append(f"{port['name']} = {'tag ' + tag if tag else 'all files'}")
    return "\n".join(lines)


def draw(template: dict[str, Any], out: Path) -> Path:
    """Render the template's nodes, connections and variable bindings to a PNG."""
    nodes = {n["id"]: n for n in template["nodes"]}
    pos0 = min((n["metadata"]["position"]["x"], n["metadata"]["position"]["y"]) for n in nodes.values())
    centers = {nid: _center(n, pos0) for nid, n in nodes.items()}
    xs = [c[0] for c in centers.values()]
    ys = [c[1] for c in centers.values()]

    fig, ax = plt.subplots(figsize=(19, 8.4), dpi=110)
    ax.set_xlim(min(xs) - 1.8, max(xs) + 1.8)
    ax.set_ylim(min(ys) - 1.9, max(ys) + 3.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(template["name"], fontsize=17, fontweight="bold", loc="left")

    # variables along the top, ordered by where their users sit (fewer crossing lines)
    users: dict[str, list[float]] = {v["name"]: [] for v in template["variables"]}
    for nid, node in nodes.items():
        for name in _node_uses(node):
            users[name].append(centers[nid][0])
    variables = sorted(template["variables"], key=lambda v: sum(users[v["name"]]) / max(len(users[v["name"]]), 1))
    var_y = max(ys) + 2.5
    step = (max(xs) - min(xs)) / max(len(variables) - 1, 1)
    var_xy = {v["name"]: (min(xs) + i * step, var_y) for i, v in enumerate(variables)}
    for var in variables:
        _box(ax, var_xy[var["name"]], VAR_W, VAR_H, VAR_COLOR.get(var["type"], "#eeeeee"), lw=1.0)
        ax.text(
            *var_xy[var["name"]], f"{var['name']}\n({var['type']})", ha="center", va="center", fontsize=9.5, zorder=4
        )
    ax.text(
        min(xs) - 1.6,
        var_y,
        "variables",
        ha="left",
        va="center",
        fontsize=9,
        style="italic",
        rotation=90,
        color="#555555",
    )

    for nid, node in nodes.items():
        for name in _node_uses(node):
            vx, vy = var_xy[name]
            nx, ny = centers[nid]
            sets = node["type"] == "updateVariable"
            ax.add_patch(
                FancyArrowPatch(
                    (nx, ny + NODE_H / 2),
                    (vx, vy - VAR_H / 2),
                    arrowstyle="-|>" if sets else "-",
                    mutation_scale=12,
                    lw=1.0,
                    ls=(0, (4, 3)),
                    color="#2ca25f" if sets else "#888888",
                    zorder=1,
                )
            )

    # connections between the same two ports (one per action) are one arrow labelled with all their actions
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for conn in template["connections"]:
        key = (conn["src"]["portId"], conn["tgt"]["portId"])
        if key in merged and conn.get("action"):
            merged[key]["action"] = f"{merged[key]['action']}, {conn['action']}"
        else:
            merged.setdefault(key, dict(conn))
    for conn in merged.values():
        src, tgt = nodes[conn["src"]["nodeId"]], nodes[conn["tgt"]["nodeId"]]
        out_port = next(p for p in src["outputs"] if p["portId"] == conn["src"]["portId"])
        in_port = next(p for p in tgt["inputs"] if p["portId"] == conn["tgt"]["portId"])
        (x0, y0), (x1, y1) = centers[src["id"]], centers[tgt["id"]]
        start = (x0 + NODE_W / 2, y0) if y0 == y1 else (x0 + NODE_W / 2 - 0.3, y0 - NODE_H / 2)
        end = (x1 - NODE_W / 2, y1)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=18,
                lw=1.8,
                color="#333333",
                connectionstyle="arc3,rad=0" if y0 == y1 else "angle,angleA=-90,angleB=180",
                zorder=2,
            )
        )
        same = out_port["name"] == in_port["name"]
        label = out_port["name"] if same else f"{out_port['name']}\n→ {in_port['name']}"
        if conn.get("action"):
            label = f"[{conn['action']}] {label}"
        lx, ly = ((start[0] + end[0]) / 2, y0 + 0.08) if y0 == y1 else (start[0] + 0.15, y1 + 0.08)
        ax.text(
            lx, ly, label, ha="center" if y0 == y1 else "left", va="bottom", fontsize=7.5, color="#333333", zorder=4
        )

    start_ids = {s["nodeId"] for s in template["startNodes"]}
    for nid, node in nodes.items():
        x, y = centers[nid]
        _box(ax, (x, y), NODE_W, NODE_H, COLORS.get(node["type"], "#eeeeee"), lw=2.6 if nid in start_ids else 1.4)
        fn = node["namespace"]["functionName"]
        ax.text(x, y + 0.14, node["name"], ha="center", va="center", fontsize=10.5, fontweight="bold", zorder=4)
        ax.text(
            x,
            y - 0.22,
            SUBTITLE.get(fn, f"{node['type']} · {fn}"),
            ha="center",
            va="center",
            fontsize=8.5,
            color="#333333",
            zorder=4,
        )
        if nid in start_ids:
            ax.text(
                x - NODE_W / 2,
                y + NODE_H / 2 + 0.05,
                "▶ start",
                ha="left",
                va="bottom",
                fontsize=8.5,
                fontweight="bold",
                color="#b30000",
                zorder=4,
            )
        if defaults := _defaults_label(node):
            ax.text(
                x - NODE_W / 2 + 0.05,
                y - NODE_H / 2 - 0.08,
                defaults,
                ha="left",
                va="top",
                fontsize=7.5,
                color="#555555",
                zorder=4,
            )

    ax.text(
        min(xs) - 1.6,
        min(ys) - 1.75,
        "solid: connections (port names)   dashed grey: reads a variable   dashed green: sets a variable   "
        "small text: default filters (DQL on metadata.system.tags)",
        fontsize=8.5,
        color="#555555",
        ha="left",
        va="bottom",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="template DPK manifest (dataloop.json)")
    parser.add_argument("--out", type=Path, default=OUT, help="PNG to write")
    args = parser.parse_args(argv)
    dpk = json.loads(args.template.read_text())
    (template,) = dpk["components"]["pipelineTemplates"]
    print(draw(template, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
