"""Conditional reward-model input: a per-domain condition (system prompt) before the prompt.

COOL-RLHF (InternLM2, arXiv 2403.17297) trains one reward model for several preference
domains and resolves their conflicts by conditioning: the RM reads a domain-specific system
prompt before the conversation. rlxf implements that as data:

- a *conditions* mapping ``domain -> condition text`` (``"default"`` = :data:`DEFAULT_CONDITIONS`
  for the built-in tasks, or a YAML file of ``domain: text``);
- each row's domain: its ``domain`` field, else the ``task:NAME`` dataset it came from;
- :func:`condition_prompt` rewrites the prompt the RM sees:

      standard prompt (str):      condition + "\\n" + prompt
      conversational (messages):  [{"role": "system", "content": condition}] + messages

  (a conversation that already opens with a system message gets the condition prepended to that
  message's content, condition + "\\n" + content, so it keeps one system turn).

The same function runs when the RM is trained (``rlxf rm --conditions``) and when it scores
(:class:`rlxf.rewards.RewardModelReward`), so the RM sees identical text in both. ``rlxf rm``
writes the mapping next to the weights (``conditions.yaml``); the ``reward_model`` reward reads it
from there, so a conditional RM cannot be used without its conditions by accident.
"""

from __future__ import annotations

from pathlib import Path

from rlxf.data.formats import DataError, row_where

CONDITIONS_FILE = "conditions.yaml"

# Plain ASCII so the embedded tiny model's character tokenizer covers every character.
DEFAULT_CONDITIONS: dict[str, str] = {
    "arithmetic": "Judge correctness of the final answer first, then brevity.",
    "sorting": "Judge whether the final list is fully sorted first, then brevity.",
}


def load_conditions(spec: str | None) -> dict[str, str] | None:
    """``None`` -> None (no conditioning); ``"default"`` -> :data:`DEFAULT_CONDITIONS`; else a
    YAML file holding a mapping of domain -> condition text (non-empty strings)."""
    if spec is None:
        return None
    if spec == "default":
        return dict(DEFAULT_CONDITIONS)
    import yaml

    path = Path(spec)
    if not path.is_file():
        raise DataError(f"conditions: file not found: {path}; pass 'default' or a YAML file of "
                        f"'domain: condition text' lines")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML: {exc}") from None
    return check_conditions(data, where=str(path))


def check_conditions(data, *, where: str) -> dict[str, str]:
    """Return ``data`` as ``{domain: condition}`` or raise :class:`DataError` saying what is wrong."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{where}: expected a non-empty mapping of domain: condition text, e.g.\n"
                        f"arithmetic: \"{DEFAULT_CONDITIONS['arithmetic']}\"")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{where}: the condition of domain(s) {', '.join(bad)} must be a non-empty string")
    return dict(data)


def save_conditions(conditions: dict[str, str], directory: str | Path) -> Path:
    """Write ``conditions`` as ``directory/conditions.yaml`` (next to a reward model's weights)."""
    import yaml

    path = Path(directory) / CONDITIONS_FILE
    path.write_text(yaml.safe_dump(dict(conditions), sort_keys=True, allow_unicode=True), encoding="utf-8")
    return path


def saved_conditions(directory: str | Path) -> dict[str, str] | None:
    """The conditions saved with the reward model in ``directory``, or None (an unconditional RM)."""
    path = Path(directory) / CONDITIONS_FILE
    return load_conditions(str(path)) if path.is_file() else None


def condition_prompt(prompt, condition: str):
    """The prompt the conditional RM reads (see the module docstring); ``prompt`` is not modified."""
    if isinstance(prompt, str):
        return f"{condition}\n{prompt}"
    if prompt and prompt[0].get("role") == "system":
        first = {**prompt[0], "content": f"{condition}\n{prompt[0]['content']}"}
        return [first, *prompt[1:]]
    return [{"role": "system", "content": condition}, *prompt]


def resolve_domain(domain, default_domain: str | None, conditions: dict[str, str], *, where: str) -> str:
    """The domain to condition on: ``domain`` (a row's field) else ``default_domain``; it must be a
    key of ``conditions``."""
    name = domain if domain is not None else default_domain
    if name is None:
        raise DataError(f"{where}: no domain to pick the reward model's condition; give the row a 'domain' "
                        f"field (one of {', '.join(sorted(conditions))}) or use a task:NAME dataset")
    if name not in conditions:
        raise DataError(f"{where}: domain {name!r} has no condition; known domains: "
                        f"{', '.join(sorted(conditions))} (add it to the conditions YAML)")
    return name


def apply_conditions(rows: list[dict], conditions: dict[str, str], *, default_domain: str | None = None
                     ) -> list[dict]:
    """Copies of ``rows`` whose ``prompt`` is conditioned on the row's domain; each copy records
    the domain it used in ``domain``."""
    out = []
    for i, row in enumerate(rows):
        domain = resolve_domain(row.get("domain"), default_domain, conditions, where=row_where(row, i))
        out.append({**row, "prompt": condition_prompt(row["prompt"], conditions[domain]), "domain": domain})
    return out
