"""`clip-finetune`: each command reads its arguments (parser.py), calls the package and prints the result."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, DataError, user_error
from .advice import cli_message
from .gate_cmd import cmd_gate
from .index_cmd import cmd_index
from .parser import build_parser
from .runs import cmd_runs, printable
from .share import SHARE_COMMANDS

log = logging.getLogger(__name__)


# what the engine's RunMismatch cannot say: how to start over from the command line
START_OVER_HINT = "from the command line: --overwrite starts over in --out, or train into another --out folder"


def _load_cfg(args: argparse.Namespace, extra: dict[str, Any] | None = None, apply: bool = True):
    from ..config import build_config
    from ..machine import apply_config
    from .config_args import load_config_file, parse_set_options

    file_cfg = load_config_file(args.config) if getattr(args, "config", None) else None
    columns = {key: getattr(args, key) for key in ("image_column", "caption_column") if getattr(args, key, None)}
    # CLI --image-column/--caption-column > --set > --config file > defaults
    cfg = build_config(extra, file_cfg, parse_set_options(args.sets), columns)
    if apply:  # every decode of this command honours the configured pixel limit; seeded (train: app.train does)
        apply_config(cfg.data)
    return cfg


def _load_clip(args: argparse.Namespace, cfg: Any = None):
    from ..app.models import open_model

    cfg = cfg or _load_cfg(args)
    return open_model(cfg, args.model), cfg


def cmd_demo(args: argparse.Namespace) -> int:
    from .config_args import parse_set_options
    from .demo import run_demo

    res = run_demo(args.out, args.train, args.validation, args.seed, parse_set_options(args.sets),
                   overwrite=args.overwrite)
    print(res.table)
    print(f"\nbest epoch {res.result.best_epoch}; wrote:")
    for name, path in res.files.items():
        print(f"  {name:13s} {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..app.train import training_of
    from ..retrieval.formatting import format_table
    from ..training.checkpoint import RunMismatch
    from ..training.guard import check_output_folder
    from .examples import embed_examples, example_pairs, save_examples
    from .retention_view import retention_text

    cfg = _load_cfg(args, apply=False)  # validated before any data is read
    if not int(os.environ.get("RANK", "0")):  # rank 0 writes --out (under torchrun the others find it in use)
        check_output_folder(args.out, (args.data, args.validation, args.test, args.retention),
                            overwrite=args.overwrite, resume=args.resume)
    training = training_of(cfg, args.data, args.validation, test=args.test, what="--data", retention=args.retention)
    rank0 = not int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 writes and prints for the run
    examples = example_pairs(training.splits) if rank0 else []
    # the base model embeds the report's examples first, as the Python API's worker does
    before = embed_examples(training.model(), examples, training.cfg) if examples else None
    try:
        result = training.run(args.out, resume=args.resume)  # also writes data_report.json
    except RunMismatch as e:
        raise RunMismatch(f"{e} ({START_OVER_HINT})") from None
    if not rank0:
        return 0
    if examples:
        save_examples(before, embed_examples(training.model(), examples, training.cfg), args.out)
    if result.before:
        where = {"test": "the test split (it chose nothing)",
                 "selection": "the selection set (it also picked the epoch: optimistic)"}[result.scored_on]
        print(f"scored on {where}:\n{format_table(result.before, result.after)}")
    print(retention_text(result.to_dict()))  # the retention set before/after and the WiSE-FT alpha, or how to add one
    if not result.before:  # nothing scored an epoch: say so, not "best epoch N" of a metric never computed
        print(f"\nno validation data: the last epoch's weights (epoch {len(result.history)}), not scored against "
              f"the base model, saved to {result.out_dir}; give --validation (or more data to hold some out) to "
              "pick the best epoch and measure it")
        return 0
    print(f"\nbest epoch {result.best_epoch} ({cfg.early_stopping_metric}); model saved to {result.out_dir}")
    if not result.improved:
        print(f"warning: {result.note}")  # the last line: a short run may have changed nothing
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..app.evaluate import default_subset, read_subsets, score
    from ..retrieval.formatting import format_scores

    alphas = _parse_alphas(args.wise_ft) if args.wise_ft else None
    if alphas is not None and not args.model:
        raise ConfigError("--wise-ft needs --model: the fine-tuned model to mix with its base")
    if args.save_mix and (alphas is None or len(alphas) != 1):
        raise ConfigError("--save-mix needs --wise-ft with exactly one alpha")
    if args.save_mix:
        from ..training.guard import check_output_folder

        check_output_folder(args.save_mix, (args.data,), overwrite=args.overwrite, flag="save_mix")
    cfg = _load_cfg(args)
    # the data before the model: a bad path fails before a model loads
    subsets = read_subsets(args.data, cfg)
    name = args.subset or default_subset(subsets)
    if name not in subsets:
        raise DataError(f"--subset {name!r} not found in {args.data!r}; subsets: {sorted(subsets)}")
    clip, cfg = _load_clip(args, cfg)
    # which subset was scored, and why that one: a score without its subset cannot be compared with another
    why = "--subset" if args.subset else "by default: test, else validation, else the first subset"
    scored = f"scored the {name!r} subset of {args.data} ({len(subsets[name])} pairs; {why})"
    if alphas is None:
        metrics = score(clip, subsets[name], cfg, progress=not args.json)
        print(json.dumps(metrics, indent=2) if args.json else format_scores(metrics, "model" if args.model else "base"))
        print(scored, file=sys.stderr if args.json else sys.stdout)  # --json: stdout stays one JSON document
        return 0
    from ..app.evaluate import wise_ft_sweep
    from ..retrieval.formatting import format_sweep

    results = wise_ft_sweep(clip, args.base, alphas, subsets[name], cfg, save_mix_to=args.save_mix)
    print(json.dumps({f"{a:g}": m for a, m in results.items()}, indent=2) if args.json else format_sweep(results))
    print(scored, file=sys.stderr if args.json else sys.stdout)
    if args.save_mix:
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


def cmd_embed(args: argparse.Namespace) -> int:
    from ..app.embed import embed_items, list_images, list_texts
    from ..files import require_writable
    from ..retrieval.shards import pin_local_gpu, shard_spec
    from ..retrieval.store import check_embeddings_out

    spec = shard_spec(args.shard_index, args.num_shards)  # None: one process writes the one --out file
    if spec is not None:
        pin_local_gpu()
        require_writable(args.out, "--out")
    else:
        check_embeddings_out(args.out)  # suffix, folder, packages: before the work, not after it
    kind = "images" if args.images else "texts"
    cfg = _load_cfg(args)
    columns = (cfg.image_column, cfg.caption_column)
    texts = None if args.images else list_texts(args.texts, columns)
    if texts is not None and not texts:  # before the model loads; never a 0-row index
        raise DataError(f"--texts {args.texts!r}: nothing to embed (no line holds text); give one text a line")
    clip, cfg = _load_clip(args, cfg)
    items = list_images(args.images, "--images", columns) if args.images else texts
    if args.images and not items:
        raise DataError(f"--images {args.images!r}: no images found")
    done = embed_items(clip, cfg, kind, items, args.out, spec)
    print(done.summary or f"wrote {done.count} vectors of {done.dimensions} dimensions to {done.out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from ..app.search import read_index, search

    index = read_index(args.index)  # a bad file fails before the model loads
    clip, _ = _load_clip(args)
    hits_per_query = search(clip, index, args.index, args.queries, args.k, allow_mismatch=args.allow_mismatch)
    print(f"answered by the {index.describe()}", file=sys.stderr)  # on stderr: stdout stays the results alone
    for query, hits in zip(args.queries, hits_per_query, strict=True):
        print(printable(query))
        for rank, (item, score) in enumerate(hits, 1):
            print(f"  {rank:2d}. {score:.4f}  {printable(str(item))}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..app.export import export

    out, settings = export(args.model, args.out, args.opset)
    print(f"exported {args.model} (opset {settings['opset']}, {settings['embed_dim']} dimensions) to {out}:")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out)}  ({path.stat().st_size / 1e6:.1f} MB)")
    if settings.get("verified_min_cosine") is not None:
        print(f"onnxruntime vs torch: lowest cosine {settings['verified_min_cosine']:.6f} on sample inputs")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from ..config import FinetuneConfig
    from .config_args import markdown_reference

    if args.markdown:
        print(markdown_reference(), end="")
    elif args.schema:
        print(json.dumps(FinetuneConfig.model_json_schema(), indent=2))
    else:
        # embeddings_size is derived from the architecture: written as null, so the output edited to another
        # model_name is still a valid --config (a written 512 would contradict a 1024-wide model)
        print(json.dumps({**_load_cfg(args).model_dump(mode="json"), "embeddings_size": None}, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import doctor_without_config, run_doctor

    try:
        cfg = _load_cfg(args)
    except Exception as e:  # a broken torch or open_clip fails the configuration itself: doctor reports that
        checks = doctor_without_config(e, args.out)
        if checks is None:
            raise
    else:
        checks = run_doctor(cfg, args.out)
    print(checks.render())
    print(f"\n{checks.problems} problem(s)" if checks.problems else "\nno problems found")
    return 1 if checks.problems else 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.source, args.out, args.runs_dir)
    print(f"wrote {path}")
    return 0


COMMANDS = {"demo": cmd_demo, "train": cmd_train, "evaluate": cmd_evaluate, "embed": cmd_embed,
            "index": cmd_index, "search": cmd_search, "config": cmd_config, "runs": cmd_runs,
            "export-onnx": cmd_export_onnx, "doctor": cmd_doctor, "report": cmd_report, "gate": cmd_gate,
            **SHARE_COMMANDS}


def _resume_hint(args: argparse.Namespace) -> str:
    """For an interrupted train whose --out holds a checkpoint: the command that continues it."""
    from ..training.state import CHECKPOINT_NAME

    if args.command != "train" or not (Path(args.out) / CHECKPOINT_NAME).is_file():
        return ""
    return f"; continue from its checkpoint with the same command plus --resume ({Path(args.out) / CHECKPOINT_NAME})"


def main(argv: list[str] | None = None) -> int:
    """The boundary of the command line: our errors, and the system refusing a file the user named, print one
    message and exit 2; anything else is a bug and stays a traceback (errors.user_error)."""
    args = build_parser().parse_args(argv)
    # the root logger at WARNING: open_clip logs its own progress through logging.info on the root logger
    # (13 "INFO root:" lines before a search's results); this package's loggers say INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    level = logging.DEBUG if args.verbose else logging.INFO
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun rank 0 speaks for the run; others warn
        level = max(level, logging.WARNING)
    logging.getLogger(__package__.rpartition(".")[0]).setLevel(level)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 prints escaped, never crashes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"clip-finetune {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `clip-finetune ... | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no flush error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        clean = user_error(e)
        if clean is None:
            raise
        print(f"clip-finetune {args.command}: error: {cli_message(clean)}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The `clip-finetune` command (the console script and `python -m adapters.clip_finetune`): main(), then the
    process ends (machine.exit_process)."""
    from ..machine import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
