"""The `clip-finetune` command line: every command, option and help text (tests/test_cli_help.py checks them)."""

from __future__ import annotations

import argparse
from typing import Any

from .gate_cmd import add_gate_parser
from .index_cmd import add_index_parser
from .runs import add_runs_parser
from .share import add_share_parsers

DESCRIPTION = """\
Fine-tune CLIP (open_clip) on images with captions for text-to-image search, evaluate retrieval before and
after, embed images and texts with the tuned model, and search them.

commands:
  demo         offline demo: synthetic data, a tiny CLIP fine-tuned on the CPU, before/after table and pictures
  train        fine-tune on a Dataloop download, a folder of subsets or a CSV/TSV/JSONL table
  evaluate     retrieval metrics (both directions) of a model on captioned data
  embed        embed images or texts into an .npz / .parquet file (or a sharded folder)
  index        build an approximate index (usearch) of an embeddings file: fast search of millions of images
  search       text-to-image search over an embeddings file or an index
  export-onnx  export a saved model's image and text towers to ONNX
  export-hf    export a saved model as a transformers CLIPModel folder
  push         upload a saved model to a Hugging Face Hub repository
  config       the configuration: defaults, merged values, JSON schema or the reference table
  runs         the runs started with the Python API: list, status, logs
  report       one self-contained HTML page of a run or a saved model: metrics, curves, examples
  gate         promote a new model only if it beats the current one and keeps what it knew (retention)
  doctor       what this machine has: versions, device, model hub or cache, disk, extras

`clip-finetune COMMAND --help` describes each. Something does not work? Start with `clip-finetune doctor`."""

MODEL_HELP = ("saved model folder (default: the base model that --config/--set describe, e.g. ViT-B-32 with "
              "pretrained weights, downloaded from the model hub)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-finetune", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_train, _add_evaluate, _add_embed, add_index_parser, _add_search, _add_export_onnx,
                _add_config):
        add(sub)
    add_share_parsers(sub)
    add_runs_parser(sub)
    add_gate_parser(sub, _config_args)
    _add_report(sub)
    _add_doctor(sub)
    return parser


def _column_args(p: argparse.ArgumentParser) -> None:
    # the config keys image_column / caption_column, as flags (they win over --config and --set)
    p.add_argument("--image-column", metavar="NAME", help="a table's image-path column (default: the first of "
                   "filepath, image, image_path, path, file, filename, img)")
    p.add_argument("--caption-column", metavar="NAME", help="a table's caption column (default: the first of "
                   "caption, text, title, description)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="JSON_FILE", help="JSON file of hyperparameters (`clip-finetune config` "
                   "lists them)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override one hyperparameter (repeatable; wins over --config); VALUE is read as JSON "
                   "when it parses, e.g. --set num_epochs=3 --set pretrained=null")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="offline demo: synthetic data, fine-tune a tiny CLIP, before/after table",
                       description="Generate synthetic captioned images, evaluate a tiny random-init CLIP, fine-tune "
                       "it on the CPU and evaluate again; writes the model, metrics and pictures. No download.")
    p.add_argument("--out", default="demo_output", help="output folder (default: ./demo_output)")
    p.add_argument("--train", type=_positive, default=1500, help="synthetic training images (default: 1500)")
    p.add_argument("--validation", type=_positive, default=300, help="synthetic validation images (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the model's init (default: 0)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override one of the demo's hyperparameters (repeatable), e.g. --set num_epochs=4")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out/model holds though an earlier demo did not write it")


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune on a Dataloop download, a train/validation folder or a table",
                       description="Fine-tune a CLIP model; the validation data picks the best epoch (saved) and "
                       "stops early. Writes an open_clip model folder with metrics.json and data_report.json.")
    p.add_argument("--data", required=True, help="a Dataloop subset download (items/ + json/), a folder of subsets "
                   "(train/, validation/, test/; also training/, val/, valid/, dev/) or a CSV/TSV/JSONL table")
    p.add_argument("--validation", metavar="DATA", help="validation data, which picks the best epoch; any of the "
                   "--data forms (default: the validation subset of --data, else a held-out part of the training "
                   "data: holdout_fraction)")
    p.add_argument("--test", metavar="DATA", help="test data, scored once at the end and reported as the 'after' "
                   "figure (default: the test subset of --data; none: 'after' is the validation set's)")
    p.add_argument("--retention", metavar="DATA", help="what the base model knows and must not lose (any of the "
                   "--data forms): scored before and after, and auto WiSE-FT keeps it within retention_tolerance "
                   "(default: the retention subset of --data; none: no retention check)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out (after a crash); "
                   "refused when the data or hyperparameters differ from the checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="train into --out even though it holds a model or files")
    _column_args(p)
    _config_args(p)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="retrieval metrics of a model on captioned data",
                       description="Text->image and image->text retrieval metrics (recall@k, MRR, nDCG, ...) of "
                       "one model, or a WiSE-FT sweep of mixes of a fine-tuned model and its base.")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--data", required=True, help="captioned data, any of the `train --data` forms")
    p.add_argument("--subset", help="subset of --data to use (default: test if present, else validation, else "
                   "train)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--wise-ft", metavar="ALPHAS", help="WiSE-FT sweep: comma-separated alphas, e.g. 0,0.25,0.5,0.75,1; "
                   "each mixes alpha x --model + (1 - alpha) x its base model")
    p.add_argument("--base", help="with --wise-ft: the base model folder (default: the base named in --model's "
                   "finetune_config.json)")
    p.add_argument("--save-mix", metavar="DIR", help="with --wise-ft and one alpha: also save that mix as a model")
    p.add_argument("--overwrite", action="store_true", help="with --save-mix: replace a model already in DIR")
    _column_args(p)
    _config_args(p)


def _add_embed(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed images or texts into an .npz/.parquet file",
                       description="L2-normalised embeddings of images (a folder or a table's image column) or "
                       "texts (one per line, or a table's caption column), with their ids.")
    p.add_argument("--model", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively), or CSV/TSV/JSONL with an image column")
    src.add_argument("--texts", help="text file (one text per line) or CSV/TSV/JSONL with a caption column")
    p.add_argument("--out", required=True, help="output file: .npz (numpy) or .parquet (pandas + pyarrow: "
                   "pip install -e \".[parquet]\"); a folder when sharded")
    p.add_argument("--num-shards", type=int, metavar="N",
                   help="embed one of N slices into the --out folder (torchrun: WORLD_SIZE); see docs/scale.md")
    p.add_argument("--shard-index", type=int, metavar="I", help="the slice to embed, 0..N-1 (torchrun: RANK)")
    _column_args(p)
    _config_args(p)


def _add_search(sub: Any) -> None:
    p = sub.add_parser("search", help="text-to-image search over an embeddings file or an index",
                       description="Embed each query with the model and print the most similar indexed items; "
                       "stderr says which index answered (exact: every vector scored; approximate: an index "
                       "folder of `clip-finetune index`).")
    p.add_argument("--model", help=MODEL_HELP + "; use the model that embedded the index")
    p.add_argument("--index", required=True, help="embeddings written by `embed --images`: an .npz / .parquet "
                   "file, or a sharded folder (or its index.json); or an index folder of `clip-finetune index`")
    p.add_argument("-k", type=_positive, default=5, help="results per query (default: 5)")
    p.add_argument("--allow-mismatch", action="store_true", help="search an index embedded by another model, or "
                   "of texts (refused otherwise: its file records the model that made it)")
    p.add_argument("queries", nargs="+", help="text queries")
    _config_args(p)


def _add_export_onnx(sub: Any) -> None:
    p = sub.add_parser("export-onnx", help="export a saved model's image and text towers to ONNX",
                       description="Export both towers (dynamic batch, unit-norm outputs) and preprocess.json; "
                       "checked against torch with ONNX Runtime. Needs pip install -e \".[onnx]\".")
    p.add_argument("--model", required=True, help="saved model folder")
    p.add_argument("--out", required=True, help="output folder (new, or an earlier export to replace)")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="print the default configuration (or the merged one) as JSON",
                       description="Print the configuration --config/--set make (the defaults without them), "
                       "its JSON schema, or the reference table of docs/configuration.md.")
    _config_args(p)
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    p.add_argument("--markdown", action="store_true", help="print the configuration reference table")


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="write one self-contained HTML page of a run or a saved model",
                       description="One HTML file (images inlined) with the metrics before and after, the "
                       "training curves, the data report and, for a run of the Python API, the queries whose "
                       "results improved or got worse.")
    p.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a run folder (./runs/NAME), a run name, or a saved "
                   "model folder")
    p.add_argument("--out", help="the HTML file to write (default: report.html inside the folder)")
    p.add_argument("--runs-dir", help="where a run name is looked up (default: $CLIP_FINETUNE_RUNS_DIR, else ./runs)")


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check this machine: versions, device, model hub or cache, disk, extras",
                       description="Print what fine-tuning here would use, and what would fail: package "
                       "versions, the device (CUDA, bf16), whether the configured weights can be downloaded or "
                       "are cached, free disk, and the optional extras installed.")
    p.add_argument("--out", default=".", help="folder whose free disk space to check (default: .)")
    _config_args(p)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
