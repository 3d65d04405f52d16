"""The embedded default model (``--model tiny``): a ~0.9M-parameter Llama with a character tokenizer.

Its weights ship in ``rlxf/zoo/tiny/`` (HF format, safetensors); ``rlxf zoo build`` re-creates them
deterministically from the built-in tasks (see :mod:`rlxf.zoo.build`).
"""

from __future__ import annotations

from pathlib import Path

TINY_NAME = "tiny"
TINY_DIR = Path(__file__).resolve().parent / "tiny"


def tiny_path() -> Path:
    """Directory of the shipped tiny model; a clear error if the weights are missing."""
    if not (TINY_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded tiny model is missing from {TINY_DIR}; rebuild it with `rlxf zoo build`")
    return TINY_DIR


def resolve_model_name(name_or_path: str) -> str:
    """Map ``tiny`` to the shipped directory; any other value passes through unchanged."""
    return str(tiny_path()) if name_or_path == TINY_NAME else name_or_path
