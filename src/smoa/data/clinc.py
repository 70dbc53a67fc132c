"""CLINC150 (Larson et al., EMNLP 2019): 150 intents in 10 domains, from the project's shared data folder.

Located at ``$SMOA_SHARED_DIR/data/clinc150`` when the variable is set, else at ``<root>/../shared/data/clinc150``
or ``<root>/shared/data/clinc150`` for the first ``<root>`` among the folders above this file and above the
current directory that has it. Splits are the dataset's own: ``train`` (100 queries per intent) and ``val``
(20 per intent); ``oos_train`` / ``oos_val`` hold 100 out-of-scope queries each (intent and domain ``"oos"``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from smoa.errors import InvalidInputError

ENV_VAR = "SMOA_SHARED_DIR"
SPLITS = ("train", "val", "oos_train", "oos_val")
_REL = Path("data") / "clinc150"


@dataclass(frozen=True)
class ClincExample:
    """One query: its text, intent and domain."""

    text: str
    intent: str
    domain: str


def _candidates() -> list[Path]:
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append(Path(env) / _REL)
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for root in (start, *start.parents):
            out += [root.parent / "shared" / _REL, root / "shared" / _REL]
    return out


def find_clinc_dir() -> Path:
    """The CLINC150 folder (see the module docstring).

    Raises:
        FileNotFoundError: it is nowhere to be found (the message lists where it looked first).
    """
    tried = _candidates()
    for path in tried:
        if (path / "clinc150_train_val.json").is_file() and (path / "domains.json").is_file():
            return path
    raise FileNotFoundError(
        f"CLINC150 not found; set ${ENV_VAR} to the folder holding data/clinc150 (looked in "
        f"{', '.join(str(p) for p in tried[:3])}, ...)"
    )


@lru_cache(maxsize=4)
def _load(folder: str) -> tuple[dict[str, list[list[str]]], dict[str, list[str]]]:
    base = Path(folder)
    data = json.loads((base / "clinc150_train_val.json").read_text(encoding="utf-8"))
    domains = json.loads((base / "domains.json").read_text(encoding="utf-8"))
    return data, domains


def clinc_domains(folder: Path | None = None) -> dict[str, list[str]]:
    """Domain -> its 15 intents."""
    _, domains = _load(str(folder or find_clinc_dir()))
    return {d: list(i) for d, i in domains.items()}


def clinc150(split: str = "train", folder: Path | None = None) -> list[ClincExample]:
    """The queries of ``split`` in file order."""
    if split not in SPLITS:
        raise InvalidInputError(f"`split` must be one of {SPLITS}, got {split!r}")
    data, domains = _load(str(folder or find_clinc_dir()))
    domain_of = {intent: d for d, intents in domains.items() for intent in intents}
    return [ClincExample(t, i, domain_of.get(i, "oos")) for t, i in data[split]]


def clinc150_by_domain(split: str = "train", folder: Path | None = None) -> dict[str, list[str]]:
    """Domain -> its query texts of ``split`` (domains in ``domains.json`` order)."""
    out: dict[str, list[str]] = {d: [] for d in clinc_domains(folder)}
    for ex in clinc150(split, folder):
        out.setdefault(ex.domain, []).append(ex.text)
    return out
