"""Every recipe's frozen config dataclass, importable without torch: the CLI builds ``--help`` and
parses flags from these, and each recipe module re-exports its own. Fields, help texts, defaults and
ranges live here once (:func:`rlxf.config.option`)."""
