"""The Python API: fit() starts a run, Run watches it, get_model()/encode() embed with the result.

    from adapters.clip_finetune import fit, get_run, get_model, encode
    run = fit(model="ViT-B-32", train_data="pairs.csv", eval_data="val.csv", num_epochs=3)
    for line in run.stream_logs(): print(line)
    vectors = encode(get_model(run, "clip-text"), ["a red dress"])

Runs live in the runs folder (run_folder.py), so get_run(name) finds them after a restart. Heavy modules (torch,
open_clip) are imported only where a model is built: starting and watching a run stays light.
"""

from .encode import Encoder, encode, get_model
from .fit import fit
from .run import Example, Run, get_run, list_runs
from .share import export_hf, push_to_hub

__all__ = ["Encoder", "Example", "Run", "encode", "export_hf", "fit", "get_model", "get_run", "list_runs",
           "push_to_hub"]
