"""Which modules a name pattern selects: one rule for `quantize_model(skip=...)`, `from_pretrained(skip=...)` and
peft_layers' `target_modules` / `exclude_modules` (the rule of Hugging Face PEFT, so configs carry over unchanged).

- a str is a regular expression that must match the whole module name: `r".*\\.(q|v)_proj"`;
- any other iterable lists names, each matching the module of exactly that name or any module whose name ends
  with "." + it: `["q_proj", "layers.0.mlp"]` selects `model.layers.3.q_proj` and `model.layers.0.mlp`, never
  `model.layers.0.mlp_norm` or `qq_proj` (whole dotted segments only);
- None (or an empty list) matches nothing.
"""
import re
from typing import Iterable, Optional, Union

Patterns = Optional[Union[str, Iterable[str]]]


def matches(name: str, patterns: Patterns) -> bool:
    """True when the module name `name` is selected by `patterns` (see the module docstring for the rule)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
