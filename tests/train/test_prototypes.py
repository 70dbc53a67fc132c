"""Prototype routing keys: spherical k-means, keys equal to the router's own, aliases flatten to the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoa.config import SMoAConfig
from smoa.errors import InvalidInputError
from smoa.mixture import SparseAdapterMixture
from smoa.routing.router import RoutingText
from smoa.train.prototypes import add_routing_prototypes, example_key, spherical_kmeans

from .helpers import TOPICS


def test_kmeans_finds_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3]
    x = np.concatenate([c + 0.05 * rng.standard_normal((20, 8)).astype(np.float32) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = spherical_kmeans(x, 3, seed=1)
    assert labels.tolist() == [0] * 20 + [1] * 20 + [2] * 20  # numbered by first appearance
    assert spherical_kmeans(x, 1).tolist() == [0] * 60
    with pytest.raises(InvalidInputError, match="`m`"):
        spherical_kmeans(x, 61)


def test_prototypes_route_back_to_the_adapter() -> None:
    with SparseAdapterMixture(SMoAConfig(encoder="hash", seed=0)) as smoa:
        ad = smoa.create_adapter_sync(domain_tags=["mixed"], skill_tags=["news"], description="weather and cooking")
        other = smoa.create_adapter_sync(domain_tags=["finance"], examples=TOPICS["finance"])
        ex = TOPICS["weather"] + TOPICS["cooking"]
        # the key helper reproduces the router's own key for the same examples (independent path)
        np.testing.assert_allclose(example_key(smoa, ad, smoa.router.encoder.encode_batch(ex)),
                                   smoa.router.routing_keys([RoutingText(["mixed"], ["news"], "weather and cooking", ex)])[0],
                                   atol=1e-6)  # fmt: skip
        aliases = add_routing_prototypes(smoa, ad.id, ex, m=2, seed=0)
        assert len(aliases) == 2 and all(a.is_composite and a.members == [(ad.id, 1.0)] for a in aliases)
        assert all(smoa.library.flatten(a.id) == [(ad.id, 1.0)] for a in aliases)
        hits = [smoa.query_adapters_sync(q, k=1).adapter_ids[0] for q in ex]
        assert set(hits) <= {a.id for a in aliases} | {ad.id} and len(set(hits) - {ad.id}) == 2  # both clusters used
        route = smoa.query_adapters_sync(TOPICS["cooking"][0], k=3)
        mix = smoa.mixture_for(route)
        stored = smoa.library.get_weights(ad.id)
        assert sum(it[-1] for it in mix if all(torch.equal(it[-2][m][1], stored[m][1]) for m in stored)) > 0.5
        assert smoa.query_adapters_sync(TOPICS["finance"][0], k=1).adapter_ids == [other.id]
