"""Principles ("the constitution") for Constitutional AI and RLAIF (arXiv 2212.08073, 2309.00267).

A principle is four texts: a ``critique`` request and a ``revision`` request (CAI's supervised
stage, ``rlxf cai-sft``) and a ``comparison`` question (what the judge is asked about a pair of
responses, ``rlxf rlaif``). The default set ships as ``constitution.yaml`` next to this module;
users copy and edit it and pass ``--principles FILE.yaml``. The file format::

    principles:
      - name: correct
        critique: "Check the answer step by step. ..."
        revision: "Rewrite the answer so that ..."
        comparison: "Which answer is correct ...?"

A bare list of principles (no ``principles:`` key) is accepted too. Every problem is a
:class:`rlxf.config.ConfigError` naming the file, the entry and the field.

Deviation from the paper, stated: CAI samples one of 16 critique/revision pairs and one of 16
comparison principles independently; rlxf keeps each principle's three texts together, so a
principle sampled for a critique has a matching revision request (as in the paper's pairs) and the
comparison principle is drawn from the same list.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import ConfigError

FIELDS = ("name", "critique", "revision", "comparison")
DEFAULT_PATH = Path(__file__).with_name("constitution.yaml")


@dataclass(frozen=True)
class Principle:
    """One principle: its name and the three requests built from it."""

    name: str
    critique: str
    revision: str
    comparison: str


def load_principles(path: str | Path | None = None) -> list[Principle]:
    """The principles in ``path`` (default: the shipped ``constitution.yaml``), validated.

    Raises :class:`ConfigError` when the file is missing, is not YAML, has no principles, or an
    entry lacks a field, has an unknown one, has an empty text, or repeats a name.
    """
    import yaml

    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise ConfigError(f"--principles: file not found: {path} (copy {DEFAULT_PATH} and edit it)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        extra = sorted(set(data) - {"principles"})
        if extra:
            raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(map(repr, extra))}; the file holds "
                              f"one key, 'principles', a list of {{{', '.join(FIELDS)}}} entries")
        data = data.get("principles")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: expected 'principles:' followed by a non-empty list of entries with "
                          f"the fields {', '.join(FIELDS)}; got {type(data).__name__}")
    principles, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path}: principle {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with the fields {', '.join(FIELDS)}, "
                              f"got {type(entry).__name__}")
        if isinstance(entry.get("name"), str) and entry["name"].strip():
            where += f" ({entry['name'].strip()!r})"
        for key in entry:
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), FIELDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the fields are {', '.join(FIELDS)}"
                raise ConfigError(f"{where}: unknown field {key!r}{hint}")
        for field in FIELDS:
            value = entry.get(field)
            if not isinstance(value, str) or not value.strip():
                got = "missing" if field not in entry else f"{type(value).__name__} {value!r:.40}"
                raise ConfigError(f"{where}: field {field!r} must be a non-empty string ({got})")
        name = entry["name"].strip()
        if name in seen:
            raise ConfigError(f"{where}: the name {name!r} is used twice; names must be unique")
        seen.add(name)
        principles.append(Principle(**{field: " ".join(entry[field].split()) for field in FIELDS}))
    return principles


def select_principle(principles: list[Principle], name: str | None) -> list[Principle]:
    """``principles`` restricted to the one called ``name`` (all of them when ``name`` is None)."""
    if name is None:
        return principles
    chosen = [p for p in principles if p.name == name]
    if not chosen:
        raise ConfigError(f"--principle {name!r} is not in the principles file; names: "
                          f"{', '.join(p.name for p in principles)}")
    return chosen


def sample_principle(principles: list[Principle], rng: random.Random) -> Principle:
    """One principle drawn uniformly (CAI and RLAIF sample one per critique / comparison)."""
    return principles[rng.randrange(len(principles))]
