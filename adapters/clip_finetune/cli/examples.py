"""The examples `clip-finetune report` shows for a model trained by `clip-finetune train`: a bounded sample of
the validation pairs embedded by the base model before training and by the saved weights after it, written to
<model>/examples/ as the Python API's worker writes them to a run folder (api.run.read_examples reads both)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..api.run_folder import EXAMPLES_DIR
from ..api.worker import save_pair_embeddings
from ..data.load import Splits
from ..data.pairs import CaptionPair

log = logging.getLogger(__name__)

# the report shows a dozen queries: a few hundred pairs rank them honestly at a few seconds' embedding, where the
# whole validation set (up to holdout_max_pairs, or all a download holds) would add minutes to a run on a CPU
EXAMPLE_PAIRS = 200


def example_pairs(splits: Splits) -> list[CaptionPair]:
    """The first EXAMPLE_PAIRS validation pairs (none without validation data)."""
    return list(splits.validation or [])[:EXAMPLE_PAIRS]


def embed_examples(clip: Any, pairs: list[CaptionPair], cfg: Any) -> Any:
    """The PairEmbeddings of `pairs` by `clip` as it is now."""
    from ..retrieval.evaluate import embed_pairs

    return embed_pairs(clip, pairs, cfg.batch_size, cfg.num_workers, progress=False)


def save_examples(before: Any, after: Any, out: str | Path) -> None:
    """Write the embeddings before and after training into <out>/examples/, once the run has finished (an
    interrupted run leaves nothing there but what training wrote)."""
    for when, emb in (("before", before), ("after", after)):
        save_pair_embeddings(Path(out) / EXAMPLES_DIR / f"{when}.npz", emb)
    log.info("wrote %d example pairs for `clip-finetune report` to %s", len(before.captions),
             Path(out) / EXAMPLES_DIR)
