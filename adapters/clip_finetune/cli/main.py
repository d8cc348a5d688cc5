"""`clip-finetune`: demo, train, evaluate, embed, search, config. Thin: parsing and printing only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ClipFinetuneError, ConfigError, DataError
from .runs import add_runs_parser, cmd_runs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JSON_FILE", help="JSON file of hyperparameters")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override one hyperparameter (repeatable); VALUE is read as JSON when it parses")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-finetune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_embed(sub)
    _add_search(sub)
    _add_export_onnx(sub)
    _add_config(sub)
    add_runs_parser(sub)
    return parser


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="offline demo: synthetic data, fine-tune a tiny CLIP, before/after table")
    p.add_argument("--out", default="demo_output", help="output folder (default: ./demo_output)")
    p.add_argument("--train", type=int, default=1500, help="synthetic training images")
    p.add_argument("--validation", type=int, default=300, help="synthetic validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[])


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune on a Dataloop download, a train/validation folder or a table")
    p.add_argument("--data", required=True, help="Dataloop subset download, folder of subsets, or CSV/TSV/JSONL")
    p.add_argument("--validation", help="validation data (default: the 'validation' subset of --data)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (after a crash)")
    _config_args(p)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="retrieval metrics of a model on captioned data")
    p.add_argument("--model", help="saved model folder (default: the base model of --config/--set)")
    p.add_argument("--data", required=True)
    p.add_argument("--subset", help="subset of --data to use (default: validation if present, else train)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--wise-ft", metavar="ALPHAS", help="WiSE-FT sweep: comma-separated alphas, e.g. 0,0.25,0.5,0.75,1; "
                   "each mixes alpha x --model + (1 - alpha) x its base model")
    p.add_argument("--base", help="with --wise-ft: the base model folder (default: the base named in --model's "
                   "finetune_config.json)")
    p.add_argument("--save-mix", metavar="DIR", help="with --wise-ft and one alpha: also save that mix as a model")
    _config_args(p)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed images or texts into an .npz/.parquet file")
    p.add_argument("--model", help="saved model folder (default: the base model of --config/--set)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images, or CSV/TSV/JSONL with an image column")
    src.add_argument("--texts", help="text file (one text per line) or CSV/TSV/JSONL with a caption column")
    p.add_argument("--out", required=True, help="output file: .npz (numpy) or .parquet (pandas); a folder when sharded")
    p.add_argument("--num-shards", type=int, metavar="N",
                   help="embed one of N slices into the --out folder (torchrun: WORLD_SIZE); see docs/scale.md")
    p.add_argument("--shard-index", type=int, metavar="I", help="the slice to embed, 0..N-1 (torchrun: RANK)")
    _config_args(p)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="text-to-image search over an embeddings file")
    p.add_argument("--model", help="saved model folder (default: the base model of --config/--set)")
    p.add_argument("--index", required=True, help="embeddings file written by `embed --images`")
    p.add_argument("-k", type=int, default=5, help="results per query")
    p.add_argument("queries", nargs="+", help="text queries")
    _config_args(p)


def _add_export_onnx(sub: Any) -> None:
    p = sub.add_parser("export-onnx", help="export a saved model's image and text towers to ONNX")
    p.add_argument("--model", required=True, help="saved model folder")
    p.add_argument("--out", required=True, help="output folder (new, or an earlier export to replace)")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="print the default configuration (or the merged one) as JSON")
    _config_args(p)
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    p.add_argument("--markdown", action="store_true", help="print the configuration reference table")


def _load_cfg(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from ..config import build_config, load_config_file, parse_set_options
    from ..machine import apply_config

    file_cfg = load_config_file(args.config) if getattr(args, "config", None) else None
    # CLI --set > --config file > defaults
    cfg = build_config(extra, file_cfg, parse_set_options(args.sets))
    apply_config(cfg)  # every decode of this command honours the configured pixel limit; seeded
    return cfg


def _load_clip(args: argparse.Namespace):
    from ..model.clip import load_artifact, load_model

    cfg = _load_cfg(args)
    return (load_artifact(args.model, cfg.device) if args.model else load_model(cfg)), cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from ..config import parse_set_options
    from .demo import run_demo

    res = run_demo(args.out, args.train, args.validation, args.seed, parse_set_options(args.sets))
    print(res.table)
    print(f"\nbest epoch {res.result.best_epoch}; wrote:")
    for name, path in res.files.items():
        print(f"  {name:13s} {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..data.load import load_splits
    from ..retrieval.formatting import format_table
    from ..training import finetune

    cfg = _load_cfg(args)  # validated before any data is read
    splits = load_splits(args.data, args.validation, what="--data")
    result = finetune(cfg, splits, args.out, resume=args.resume)  # also writes data_report.json
    if int(os.environ.get("RANK", "0")):  # under torchrun, rank 0 writes and prints for the run
        return 0
    if splits.validation:
        print(format_table(result.before, result.after))
    print(f"\nbest epoch {result.best_epoch} ({cfg.early_stopping_metric}); model saved to {result.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data.load import load_dataset
    from ..retrieval.evaluate import evaluate
    from ..retrieval.formatting import format_table

    alphas = _parse_alphas(args.wise_ft) if args.wise_ft else None
    if alphas is not None and not args.model:
        raise ConfigError("--wise-ft needs --model: the fine-tuned model to mix with its base")
    if args.save_mix and (alphas is None or len(alphas) != 1):
        raise ConfigError("--save-mix needs --wise-ft with exactly one alpha")
    clip, cfg = _load_clip(args)
    subsets, _ = load_dataset(args.data)
    name = args.subset or ("validation" if "validation" in subsets else next(iter(subsets)))
    if name not in subsets:
        raise DataError(f"--subset {name!r} not found in {args.data!r}; subsets: {sorted(subsets)}")
    if alphas is None:
        metrics = evaluate(clip, subsets[name], cfg.batch_size, cfg.num_workers)
        print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
        return 0
    from ..retrieval.evaluate import base_model_of, save_wise_ft_mix, wise_ft_sweep
    from ..retrieval.formatting import format_sweep

    base = base_model_of(clip, args.base, cfg.device)
    results = wise_ft_sweep(clip, base, alphas, subsets[name], cfg.batch_size, cfg.num_workers)
    print(json.dumps({f"{a:g}": m for a, m in results.items()}, indent=2) if args.json else format_sweep(results))
    if args.save_mix:
        save_wise_ft_mix(clip, base, alphas[0], args.save_mix, results[alphas[0]])
        print(f"saved the alpha={alphas[0]:g} mix to {args.save_mix}")
    return 0


def _parse_alphas(text: str) -> list[float]:
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"--wise-ft {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    bad = [a for a in alphas if not 0 <= a <= 1]
    if not alphas or bad:
        raise ConfigError(f"--wise-ft {text!r}: each alpha must be in [0, 1]")
    return alphas


def _list_images(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    from ..data.tables import read_table

    return list(dict.fromkeys(p.image for p in read_table(path)))


def _list_texts(source: str) -> list[str]:
    path = Path(source)
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl"):
        from ..data.tables import read_table

        return [p.caption for p in read_table(path)]
    if not path.is_file():
        raise DataError(f"--texts {source!r} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cmd_embed(args: argparse.Namespace) -> int:
    from ..retrieval.embed import encode_items
    from ..retrieval.shards import embed_shard, pin_local_gpu, shard_spec
    from ..retrieval.store import save_embeddings

    spec = shard_spec(args.shard_index, args.num_shards)  # None: one process writes the one --out file
    if spec is not None:
        pin_local_gpu()
    clip, cfg = _load_clip(args)
    kind = "images" if args.images else "texts"
    if cfg.compile and args.images:
        from ..model.compiling import compile_module

        compile_module(clip.model.visual, "the image tower")
    items = _list_images(args.images) if args.images else _list_texts(args.texts)
    if args.images and not items:
        raise DataError(f"--images {args.images!r}: no images found")
    if spec is not None:
        if not items:
            raise DataError(f"--texts {args.texts!r}: nothing to embed")
        settings = {"max_image_pixels": cfg.max_image_pixels} if args.images else {}
        print(embed_shard(clip, kind, items, args.out, spec, cfg.batch_size, cfg.num_workers, settings).summary)
        return 0
    ids, vectors, _ = encode_items(clip, kind, items, cfg.batch_size, cfg.num_workers)
    out = save_embeddings(args.out, ids, vectors)
    print(f"wrote {len(ids)} vectors of {vectors.shape[1]} dimensions to {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..retrieval.search import search_texts
    from ..retrieval.store import load_embeddings

    clip, _ = _load_clip(args)
    ids, vectors = load_embeddings(args.index)
    for query, hits in zip(args.queries, search_texts(clip, ids, vectors, args.queries, args.k), strict=True):
        print(f"{query}")
        for rank, (item, score) in enumerate(hits, 1):
            print(f"  {rank:2d}. {score:.4f}  {item}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..model.onnx_export import export_onnx

    out = export_onnx(args.model, args.out, args.opset)
    settings = json.loads((out / "preprocess.json").read_text())
    print(f"exported {args.model} (opset {settings['opset']}, {settings['embed_dim']} dimensions) to {out}:")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out)}  ({path.stat().st_size / 1e6:.1f} MB)")
    if settings.get("verified_min_cosine") is not None:
        print(f"onnxruntime vs torch: lowest cosine {settings['verified_min_cosine']:.6f} on sample inputs")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ..config import FinetuneConfig, markdown_reference

    if args.markdown:
        print(markdown_reference(), end="")
    elif args.schema:
        print(json.dumps(FinetuneConfig.model_json_schema(), indent=2))
    else:
        print(_load_cfg(args).model_dump_json(indent=2))
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "embed": cmd_embed,
            "search": cmd_search, "config": cmd_config, "runs": cmd_runs,
            "export-onnx": cmd_export_onnx}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except ClipFinetuneError as e:
        print(f"clip-finetune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
