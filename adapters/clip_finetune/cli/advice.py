"""Advice in the command line's terms: an engine error names the settings it advises (errors.Setting: a
configuration key or a use case's argument); here each becomes the flag a user types (`--resume`,
`--set pretrained=null`), and a use case the command that runs it."""

from __future__ import annotations

from ..errors import ClipFinetuneError, Setting

# a use case's arguments that are flags of their own; every other name is a configuration key (--set KEY=VALUE)
FLAGS = {
    "out": "--out",
    "save_mix": "--save-mix",
    "resume": "--resume",
    "overwrite": "--overwrite",
    "allow_mismatch": "--allow-mismatch",
    "base": "--base",
    "shard_index": "--shard-index",
    "num_shards": "--num-shards",
    "images": "--images",
    "texts": "--texts",
    "embeddings": "--embeddings",
    "opset": "--opset",
}
# a use case the advice names: the command that runs it (a value: what it embeds, images or texts)
COMMANDS = {"embed": "clip-finetune embed", "doctor": "clip-finetune doctor", "index": "clip-finetune index"}


def say_flag(setting: Setting) -> str:
    """`setting` as typed on the command line."""
    name, value, _ = setting
    if name in COMMANDS:
        return f"`{COMMANDS[name]}`" if value is None else f"{COMMANDS[name]} --{value} ..."
    if name in FLAGS:
        return FLAGS[name] if value is None else f"{FLAGS[name]} {value}"
    return f"--set {name}={'VALUE' if value is None else value}"


def cli_message(e: BaseException) -> str:
    """What the command line prints for an error: its advice said as flags."""
    return e.render(say_flag) if isinstance(e, ClipFinetuneError) else str(e)
