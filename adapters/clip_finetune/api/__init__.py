"""The Python API: fit() starts a run, Run watches it, get_model()/encode() embed with the result."""

from .run import Encoder, Example, Run, encode, fit, get_model, get_run, list_runs

__all__ = ["Encoder", "Example", "Run", "encode", "fit", "get_model", "get_run", "list_runs"]
