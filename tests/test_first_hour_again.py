"""Issue 25, "The first hour, again": what a newcomer met in the first hour, each reproduced here first."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_MODEL, TINY_TRAINING, set_args

from adapters.clip_finetune import fit
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.config import build_config, metric_names
from adapters.clip_finetune.data.load import load_splits
from adapters.clip_finetune.data.synthetic import write_csv, write_dataloop_download
from adapters.clip_finetune.errors import ConfigError, DataError
from adapters.clip_finetune.training import CHECKPOINT_NAME, finetune
from adapters.clip_finetune.training import loop as training_loop

TINY = set_args({**TINY_TRAINING, "model_name": TINY_MODEL})


def test_an_unknown_early_stopping_metric_is_refused_listing_the_valid_names() -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"early_stopping_metric": "recall"})
    message = str(e.value)
    valid = [m for m in metric_names() if not m.endswith("_rank")]
    assert "unknown metric 'recall'" in message and "valid (higher is better)" in message
    assert all(name in message for name in valid)


def test_the_printed_config_edited_to_another_model_is_a_valid_config(tmp_path: Path, capsys) -> None:
    assert main(["config"]) == 0
    written = json.loads(capsys.readouterr().out)
    written["model_name"] = "ViT-L-14"  # 768-dimensional embeddings, where ViT-B-32's are 512
    f = tmp_path / "hyperparameters.json"
    f.write_text(json.dumps(written))
    assert main(["config", "--config", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["model_name"] == "ViT-L-14"
    assert build_config(written).embeddings_size == 768  # derived again from the model it names now


def test_fit_refuses_a_custom_architecture_left_on_a_pretrained_tag_before_the_run_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pretrained: 'openai' is an open_clip pretrained tag.*pretrained=None"):
        fit(str(TINY_MODEL), [("a.png", "a caption")], runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started
    # a named architecture keeps its tag; the custom one trains from random init or from weights made for it
    assert build_config({"model_name": "ViT-B-32"}).pretrained == "openai"
    assert build_config({"model_name": str(TINY_MODEL), "pretrained": None}).pretrained is None


def test_max_steps_stops_after_that_many_optimisation_steps(tmp_path: Path, monkeypatch) -> None:
    data = write_dataloop_download(tmp_path / "data", 64, 16, seed=1)
    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL), "num_epochs": 3, "max_steps": 5,
                        "early_stopping": False})
    steps = []
    real_step = training_loop.train_step
    monkeypatch.setattr(training_loop, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    result = finetune(cfg, load_splits(data, cfg=cfg), tmp_path / "m", progress=False)
    assert len(steps) == 5  # 4 steps per epoch (64 pairs in batches of 16): the second epoch is cut after one
    assert [r["epoch"] for r in result.history] == [1, 2]  # the cut epoch is validated, then the run ends
    assert json.loads((tmp_path / "m" / "finetune_config.json").read_text())["max_steps"] == 5


def test_max_steps_is_documented_and_in_the_apps_model_configurations() -> None:
    assert "| `max_steps` |" in (REPO / "docs" / "configuration.md").read_text()
    manifest = json.loads((REPO / "dataloop.json").read_text())
    configs = [m["configuration"] for m in manifest["components"]["models"]]
    assert configs and all(c["max_steps"] is None and c["image_column"] is None for c in configs)


def _odd_table(tmp_path: Path) -> Path:
    """write_csv's table with its columns renamed to names no default picks."""
    table = write_csv(tmp_path / "pairs.csv", 24, seed=2)
    lines = table.read_text().splitlines()
    odd = tmp_path / "odd.csv"
    odd.write_text("\n".join(["picture_file,alt_text", *lines[1:]]) + "\n")
    return odd


def test_tables_with_other_column_names_are_read_with_the_columns_named(tmp_path: Path) -> None:
    odd = _odd_table(tmp_path)
    with pytest.raises(DataError, match="has no image column"):
        load_splits(odd)
    cfg = build_config({"image_column": "picture_file", "caption_column": "alt_text", "holdout_fraction": 0})
    splits = load_splits(odd, cfg=cfg)
    assert len(splits.train) == 24 and splits.train[0].caption and Path(splits.train[0].image).is_file()
    with pytest.raises(DataError, match=r"no column 'alt' \(the caption column you named: --caption-column"):
        load_splits(odd, cfg=build_config({"image_column": "picture_file", "caption_column": "alt"}))


def test_embed_and_evaluate_take_image_and_caption_column_flags(tmp_path: Path, capsys) -> None:
    odd = _odd_table(tmp_path)
    columns = ["--image-column", "picture_file", "--caption-column", "alt_text"]
    assert main(["embed", "--texts", str(odd), "--out", str(tmp_path / "t.npz"), *columns, *TINY]) == 0
    assert "wrote 24 vectors" in capsys.readouterr().out
    assert main(["embed", "--images", str(odd), "--out", str(tmp_path / "i.npz"), *columns, *TINY]) == 0
    assert "wrote 24 vectors" in capsys.readouterr().out
    assert main(["evaluate", "--data", str(odd), *columns, *TINY]) == 0
    out = capsys.readouterr().out
    # evaluate says which subset it scored (a table is one subset, named train)
    assert out.strip().splitlines()[-1].startswith(f"scored the 'train' subset of {odd} (24 pairs;")


def test_evaluate_says_which_subset_it_scored_also_with_json(tmp_path: Path, capsys) -> None:
    data = write_dataloop_download(tmp_path / "data", 16, 12, seed=3)
    assert main(["evaluate", "--data", str(data), "--json", *TINY]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout is still one JSON document
    assert "scored the 'validation' subset" in captured.err and "(12 pairs; by default" in captured.err


def test_an_interrupted_train_suggests_resume_when_a_checkpoint_exists(tmp_path: Path, monkeypatch,
                                                                       capsys) -> None:
    import adapters.clip_finetune.training.fit as training  # where app.train.Training.run calls it

    data = write_dataloop_download(tmp_path / "data", 16, 12, seed=3)
    out = tmp_path / "m"

    def interrupted(cfg, splits, out_dir, **kwargs):  # Ctrl-C after a checkpoint was written
        if write_checkpoint:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / CHECKPOINT_NAME).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "finetune", interrupted)
    for write_checkpoint in (False, True):
        assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 130
        err = capsys.readouterr().err.strip()
        if write_checkpoint:
            assert err.startswith("clip-finetune train: interrupted; continue from its checkpoint with the same "
                                  "command plus --resume")
        else:
            assert err == "clip-finetune train: interrupted"


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "adapters.clip_finetune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_two_process_run_prints_no_warnings_no_open_clip_info_lines_and_each_line_once(tmp_path: Path) -> None:
    data = write_dataloop_download(tmp_path / "data", 48, 16, seed=5)
    done = _cli("train", "--data", str(data), "--out", "m", *TINY, "--set", "num_processes=2",
                "--set", "num_epochs=1", "--set", "learning_rate=1e-12", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr and "RuntimeWarning" not in done.stderr, done.stderr
    # open_clip's logging.info calls ("Loaded ... model config.") are not printed, in either process; ours are
    assert "INFO root" not in done.stderr, done.stderr
    assert re.search(r"INFO adapters\.clip_finetune\.model\.clip: loaded clip-tiny", done.stderr), done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("rank 1:")], done.stderr  # nothing only repeated
    assert sum("no epoch beat the base model" in line for line in lines) == 1


def test_the_readme_has_a_cpu_only_install_line_and_keeps_its_first_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.*?)\n```", readme, flags=re.S | re.M)
    assert commands[0] == "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && clip-finetune demo"
    assert commands[1].endswith('pip install -e ".[test]" && pytest')
    cpu = next(c for c in commands if "download.pytorch.org" in c)
    # PyTorch's CPU wheels first (torchvision with it: open_clip needs it), then the package, which keeps them
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu && pip install -e ." in cpu
    assert "cannot" in readme[readme.index(cpu):][:600]  # the README says this line is not run by the tests




def test_the_readmes_python_example_runs_twice_in_the_same_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M) if "fit(" in b)
    # the same code on less data and one epoch (the README's sizes take minutes on a CPU): only numbers change
    small = block
    for old, new in (("n_train=500", "n_train=48"), ("n_validation=100", "n_validation=16"),
                     ("num_epochs=6", "num_epochs=1")):
        assert old in small
        small = small.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CLIP_FINETUNE_RUNS_DIR", raising=False)
    for _ in range(2):  # a newcomer runs the example, then runs it again
        names: dict = {}
        exec(compile(small, "README.md", "exec"), names)
        assert capsys.readouterr().out.strip().splitlines()[-1] == "(1, 64)"
        run = names["run"]  # fit() returned at once: a background run, which starts without runpy's warning
        assert run.wait(timeout=300)["status"] == "finished", run.logs()
        assert "RuntimeWarning" not in run.logs() and "frozen runpy" not in run.logs()
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert (tmp_path / "example_model" / "open_clip_model.safetensors").is_file()


def test_the_report_of_a_cli_run_names_its_split_keeps_the_notes_and_shows_examples(tmp_path: Path, capsys) -> None:
    data = write_dataloop_download(tmp_path / "data", 64, 24, seed=7)
    test = write_dataloop_download(tmp_path / "test", 1, 20, seed=8) / "validation"
    quick = [*TINY, "--set", "num_epochs=2", "--set", "learning_rate=2e-3"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), *quick]) == 0
    assert main(["train", "--data", str(data), "--test", str(test), "--out", str(tmp_path / "t"), *quick]) == 0
    assert main(["report", str(tmp_path / "m")]) == 0 and main(["report", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    selection, tested = ((tmp_path / m / "report.html").read_text() for m in ("m", "t"))
    assert "Retrieval metrics (validation, the selection set)" in selection
    assert "so it flatters the model" in selection
    assert "Retrieval metrics (test split, scored once at the end)" in tested and "(validation)" not in tested
    assert "it chose nothing" in tested
    # examples for a CLI-trained model: embedded at training time, bounded, beside the weights
    for page in (selection, tested):
        assert re.search(r"Of 24 validation captions, the described image entered the top 5 for \d+", page)
        assert "<h3>Improved</h3>" in page and "<h3>Got worse</h3>" in page


def _class_folders(root: Path, n: int) -> Path:
    """`n` synthetic images sorted into one folder per shape (5 classes), as a newcomer's class-folder set."""
    from adapters.clip_finetune.data.synthetic import render, sample_specs

    for i, sample in enumerate(sample_specs(n, 11)):
        folder = root / sample.attributes["shape"]
        folder.mkdir(parents=True, exist_ok=True)
        render(sample, 32).save(folder / f"{i:03d}.png")
    return root


def test_a_small_class_folder_set_gets_held_out_scores(tmp_path: Path) -> None:
    splits = load_splits(_class_folders(tmp_path / "classes", 48))
    assert splits.held_out and len(splits.validation) == 10 and len(splits.train) == 38  # was: no hold-out at all
    # captions written per image keep the 10% rule: 48 pairs hold out 5, too few, so none
    assert load_splits(write_csv(tmp_path / "pairs.csv", 48, seed=1)).validation is None


def test_a_base_model_near_the_metrics_ceiling_is_named_in_the_no_gain_note() -> None:
    from adapters.clip_finetune.training.selection import Selection
    from adapters.clip_finetune.training.state import no_gain_note

    cfg = build_config({**TINY_TRAINING, "model_name": str(TINY_MODEL)})
    sel = Selection.of(cfg.selection, has_validation=True)
    near = no_gain_note(cfg.optimisation, sel, 0.96, 2)
    assert "the base model already scores 0.96 of at most 1 on text_to_image/mrr" in near
    assert "select on text_to_image/map (early_stopping_metric)" in near and "early_stopping false" in near
    assert "already scores" not in no_gain_note(cfg.optimisation, sel, 0.4, 2)


def test_a_run_without_validation_does_not_end_on_a_best_epoch_line(tmp_path: Path, capsys) -> None:
    table = write_csv(tmp_path / "pairs.csv", 24, seed=4)  # too few to hold any out
    assert main(["train", "--data", str(table), "--out", str(tmp_path / "m"), *TINY, "--set", "num_epochs=1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("no validation data: the last epoch's weights (epoch 1), not scored against the base")
    assert not last.startswith("best epoch")
