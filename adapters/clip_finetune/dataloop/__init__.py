"""The Dataloop faces: the model adapter, the pipeline nodes and the platform calls (the only package that
imports dtlpy)."""

from .sdk_overhead import skip_caller_source

skip_caller_source()
