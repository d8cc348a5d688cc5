"""`clip-finetune gate`: the promotion gate from the command line (app/gate.py, the rule the Dataloop gate
applies): score a new model and the current one on test data and on a retention set, print both and the verdict,
and exit 0 when the new model is promoted, 1 when the current one is kept (a script or CI job can branch on it)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError, DataError


def cmd_gate(args: argparse.Namespace) -> int:
    from ..app.evaluate import default_subset, read_subsets
    from ..app.gate import compare_models
    from ..app.models import open_model
    from ..config import build_config, metric_names
    from ..machine import apply_config
    from ..retrieval.formatting import format_table
    from .config_args import load_config_file, parse_set_options

    cfg = build_config(load_config_file(args.config) if args.config else None, parse_set_options(args.sets))
    if args.metric is not None and args.metric not in metric_names():
        raise ConfigError(f"--metric: unknown metric {args.metric!r}; known: {', '.join(metric_names())}")
    if args.margin < 0:
        raise ConfigError(f"--margin: must be >= 0 (got {args.margin:g})")
    apply_config(cfg)  # the pixel limit of every decode, the seeds
    pairs = _subset(read_subsets(args.data, cfg), args.subset, "--data", default_subset)
    retention = _subset(read_subsets(args.retention, cfg), None, "--retention", _retention_subset) \
        if args.retention else None
    new, current = open_model(cfg, args.model), open_model(cfg, args.current)
    verdict = compare_models(new, current, pairs, cfg, retention, args.metric, args.margin)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        print(f"target ({args.data}), current -> new:\n{format_table(verdict.current, verdict.new)}")
        if retention:
            print(f"\nretention set ({args.retention}), current -> new:\n"
                  f"{format_table(verdict.current_retention, verdict.new_retention)}")
        print(f"\n{verdict.summary()}")
    return 0 if verdict.promoted else 1


def _subset(subsets: dict[str, list], name: str | None, flag: str, default: Any) -> list:
    name = name or default(subsets)
    if name not in subsets:
        raise DataError(f"{flag}: no subset {name!r}; subsets: {sorted(subsets)}")
    return subsets[name]


def _retention_subset(subsets: dict[str, list]) -> str:
    """A retention set's subset: 'retention', else test, else validation, else the first."""
    return next((s for s in ("retention", "test", "validation") if s in subsets), next(iter(subsets)))


def add_gate_parser(sub: Any, config_args: Any) -> None:
    p = sub.add_parser("gate", help="promote a new model only if it beats the current one and keeps the retention "
                       "set", description="Score a new model and the current one on test data and, with "
                       "--retention, on what the current model knows; the new model is promoted (exit 0) when "
                       "it is better on --data by more than --margin and at most retention_tolerance worse on "
                       "--retention, else kept out (exit 1), with the reason. See docs/retention.md.")
    p.add_argument("--model", required=True, help="the new model: a saved model folder")
    p.add_argument("--current", help="the current model: a saved model folder (default: the base model that "
                   "--config/--set describe)")
    p.add_argument("--data", required=True, help="test data, any of the `train --data` forms (neither model may "
                   "have trained or picked an epoch on it)")
    p.add_argument("--subset", help="subset of --data (default: test, else validation, else the first)")
    p.add_argument("--retention", metavar="DATA", help="what the current model knows and the new one must not "
                   "lose (default: no retention check)")
    p.add_argument("--metric", help="the metric compared (default: early_stopping_metric)")
    p.add_argument("--margin", type=float, default=0.0, help="how much better the new model must be (default: 0)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    config_args(p)
