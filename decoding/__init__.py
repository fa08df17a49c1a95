"""The decoding engine: model loading, greedy AR and Jacobi decoders, their traces, the benchmark."""
from .decoders import DECODERS, DecodeConfig, ar_decode, jacobi_decode, lookup_decode, run, validate
from .models import (DEFAULT_ADAPTER, DEFAULT_SPEC, PRESETS, LoadedModel, ModelLoadError, adapter_sha256, default_adapter,
                     load_model)
from .prompts import encode, read_prompts
from .trace import DecodeTrace, Iteration

__all__ = [
    "DECODERS", "DecodeConfig", "ar_decode", "jacobi_decode", "lookup_decode", "run", "validate",
    "DEFAULT_ADAPTER", "DEFAULT_SPEC", "PRESETS", "LoadedModel", "ModelLoadError", "adapter_sha256", "default_adapter",
    "load_model",
    "encode", "read_prompts", "DecodeTrace", "Iteration",
]
