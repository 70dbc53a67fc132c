"""Routing keys: one unit vector per adapter, in the encoder's space.

``key = normalise(alpha * e(text) + (1 - alpha) * normalise(mean_j e(example_j)))``, where ``text`` joins the
adapter's tags and description (:func:`routing_text`) and the example centroid is used only when examples are
given (LoRA-Retriever-style). ``alpha = TEXT_WEIGHT`` (0.1: examples carry most of the meaning; measured on
CLINC150 val in ``docs/bench_routing.md``).

:func:`refine_keys` optionally learns better keys from the examples of many adapters at once: a cosine-softmax
classifier (NormFace) whose class weights *are* the keys, so the result is still one unit vector per adapter in
the same ANN index with the same cosine score scale, no separate model::

    p(a | x) = softmax_a( cos(e(x), key_a) / tau )      trained by cross-entropy on (example, its adapter)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from smoa.routing.encoders import l2_normalize

TEXT_WEIGHT = 0.1


def routing_text(domain_tags: Sequence[str], skill_tags: Sequence[str], description: str = "") -> str:
    """The text an adapter is known by: ``"<domain tags> <skill tags>. <description>"``, underscores as spaces."""
    tags = " ".join(t.replace("_", " ").replace("-", " ") for t in [*domain_tags, *skill_tags])
    return f"{tags}. {description}".strip(" .") if description else tags


def blend_keys(text_vecs: np.ndarray, centroids: np.ndarray, has_examples: np.ndarray, alpha: float) -> np.ndarray:
    """Move each text embedding toward its example centroid.

    Args:
        text_vecs: float32 ``[n, d]`` unit embeddings of the routing texts.
        centroids: float32 ``[n, d]`` unit example centroids (rows without examples are ignored).
        has_examples: bool ``[n]``.
        alpha: weight of the text embedding where examples exist.

    Returns:
        float32 ``[n, d]`` unit keys.
    """
    mix = np.where(has_examples[:, None], alpha * text_vecs + (1.0 - alpha) * centroids, text_vecs)
    return l2_normalize(mix)


def example_centroids(example_vecs: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Unit mean of the example embeddings of each of ``n`` adapters.

    Args:
        example_vecs: float32 ``[m, d]``.
        owner: int ``[m]``, adapter row of each example.
        n: number of adapters.

    Returns:
        float32 ``[n, d]`` (zero rows for adapters without examples).
    """
    sums = np.zeros((n, example_vecs.shape[1]), np.float64)
    np.add.at(sums, owner, example_vecs)
    return l2_normalize(sums)


def refine_keys(
    keys: np.ndarray,
    example_vecs: np.ndarray,
    labels: np.ndarray,
    temperature: float = 0.05,
    epochs: int = 30,
    lr: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Learn keys that separate the adapters' own examples (cosine-softmax classifier, weights = keys).

    Args:
        keys: float32 ``[n, d]`` initial unit keys (e.g. from :func:`blend_keys`).
        example_vecs: float32 ``[m, d]`` unit embeddings of the examples.
        labels: int ``[m]`` row in ``keys`` of each example's adapter.
        temperature: softmax temperature ``tau`` of the cosine logits.
        epochs: full passes of Adam over the examples (mini-batches of 256).
        lr: Adam learning rate.
        weight_decay: pull toward the initial keys (L2 on ``key - key_0``).
        seed: shuffling seed.

    Returns:
        float32 ``[n, d]`` unit keys. Adapters without examples keep their initial key.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    init = torch.from_numpy(np.ascontiguousarray(keys, np.float32))
    w = torch.nn.Parameter(init.clone())
    x = torch.from_numpy(np.ascontiguousarray(example_vecs, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 256):
            idx = perm[start : start + 256]
            wn = torch.nn.functional.normalize(w, dim=1)
            logits = x[idx] @ wn.T / temperature  # [b, n]
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            if weight_decay:
                loss = loss + weight_decay * ((w - init) ** 2).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    out = torch.nn.functional.normalize(w.detach(), dim=1).numpy()
    trained = np.zeros(len(keys), bool)
    trained[np.asarray(labels)] = True
    return np.where(trained[:, None], out, keys).astype(np.float32)
