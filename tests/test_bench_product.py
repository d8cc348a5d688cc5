"""bench/product.py (issue 26's product preset): a Dataloop download the project reads, titles as promised, and
bench/train_cli.py's `clip-finetune train` command valid for the project's configuration."""

from collections import Counter
from pathlib import Path

from adapters.clip_finetune.cli.config_args import parse_set_options
from adapters.clip_finetune.config import FinetuneConfig
from adapters.clip_finetune.data.load import load_splits
from bench.product import write_product_download
from bench.train_cli import cli_command


def test_product_download_is_read_as_written_with_a_quarter_duplicate_titles(tmp_path: Path) -> None:
    written = write_product_download(tmp_path, {"train": 80, "validation": 20}, seed=3, width=64, height=48)
    splits = load_splits(tmp_path)
    assert sorted((p.image, p.caption) for p in splits.train) == sorted(written["train"])
    assert sorted((p.image, p.caption) for p in splits.validation) == sorted(written["validation"])
    assert all(p.item_id for p in splits.train)  # read from json/ records, not from file names
    titles = Counter(c for _, c in written["train"])
    repeats = sum(n - 1 for n in titles.values()) / len(written["train"])
    assert 0.1 <= repeats <= 0.4  # ~a quarter are a second photo of a product, with its title
    assert not {c for _, c in written["train"]} & {c for _, c in written["validation"]}
    assert any(w in " ".join(titles) for w in ("Tasse", "Flasche", "Stuhl", "Vase", "Rucksack"))  # German too
    assert (tmp_path / "train" / "json" / "products" / "train-00000.json").is_file()


def test_cli_command_sets_the_recipe_as_valid_configuration(tmp_path: Path) -> None:
    spec = {"model": "ViT-B-32", "init": "init.pt", "batch": 128, "epochs": 10, "lr": 2e-3, "warmup": 50,
            "wd": 0.1, "clip": None, "seed": 0, "device": "cpu", "workers": 0, "data_arg": str(tmp_path)}
    cmd = cli_command(spec, tmp_path / "out", steps=1)
    assert cmd[cmd.index("--data") + 1] == str(tmp_path)
    sets = parse_set_options([cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"])
    cfg = FinetuneConfig(**sets)
    assert (cfg.grad_clip_norm, cfg.learning_rate, cfg.warmup, cfg.max_steps) == (None, 2e-3, 50, 1)
    assert cfg.early_stopping is False and cfg.train_batch_size == 128
