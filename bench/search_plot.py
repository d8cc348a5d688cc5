"""The picture of docs/performance.md's search table: how query cost, throughput and memory grow with the number of
vectors, one line per index, from the JSON lines `python -m bench.search` printed.

    python -m bench.search --n 10000 > search-10k.jsonl   (and 100k, 1M)
    python -m bench.search_plot search-*.jsonl --out assets/search_scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def read_results(paths: list[str]) -> dict[str, list[dict]]:
    """{index name: its results sorted by n} from JSON-lines files (other lines are skipped)."""
    by_index: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                by_index[result["index"]].append(result)
    return {name: sorted(rows, key=lambda r: r["n"]) for name, rows in by_index.items()}


COLUMNS = ("n", "index", "recall_at_10", "p50_ms", "p50_cpu_ms", "qps", "cpu_ms_per_query", "build_s", "build_cpu_s",
           "peak_rss_mb", "bytes_per_vector", "load_avg_1m")


def table(results: dict[str, list[dict]]) -> str:
    """The results as docs/performance.md's markdown table, by n then as listed."""
    from .common import markdown_table

    rows = sorted((r for rs in results.values() for r in rs), key=lambda r: r["n"])
    return markdown_table(COLUMNS, [[f"{r[c]:,}" if c == "n" else r.get(c, "") for c in COLUMNS] for r in rows])


def plot(results: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # CPU time, not wall time: the shared machine's load swung between runs, CPU time does not see it
    panels = ((lambda r: r.get("p50_cpu_ms"), "one query, CPU ms (p50, one thread)"),
              (lambda r: 2000 / r["cpu_ms_per_query"], "queries / s on 2 idle cores (from CPU time)"),
              (lambda r: r["peak_rss_mb"], "peak memory of the process (MB)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (value, title) in zip(axes, panels, strict=True):
        for name, rows in results.items():
            points = [(r["n"], value(r)) for r in rows if value(r) is not None]
            ax.plot(*zip(*points, strict=True), marker="o", label=name, linestyle="--" if name == "exact" else "-")
        ax.set(title=title, xlabel="stored vectors (512-d)", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON-lines files of python -m bench.search")
    parser.add_argument("--out", default="assets/search_scaling.png", help="PNG to write "
                        "(default: assets/search_scaling.png)")
    args = parser.parse_args(argv)
    results = read_results(args.results)
    print(table(results))
    print(f"wrote {plot(results, Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
