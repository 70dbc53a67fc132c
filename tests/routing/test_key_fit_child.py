"""The key fits and the projection's tuning of a refit run in a child interpreter (smoa.routing.child,
learner.fit_keys_many, KeyLearner.tune_projection): the same result as in this thread, bit for bit; a child that
fails or gives bad arrays is refused and the work runs here; ``Router.refit`` (optimize_library, the background
optimiser) uses the child, a create does not."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from smoa.routing import learner as learner_mod
from smoa.routing.learner import FitJob, fit_keys_many

from .test_learning import TOPICS, create, fast_router, make


def _jobs(rng: np.random.Generator) -> list[FitJob]:
    d, n = 32, 4
    init = rng.standard_normal((2 * n, d)).astype(np.float32)
    init /= np.linalg.norm(init, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n), 2)
    x = rng.standard_normal((60, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, n + 3, 60)  # labels past n: the fixed rows' classes
    fixed = rng.standard_normal((3, d)).astype(np.float32)
    return [FitJob(init, owner, x, np.minimum(y, n - 1), None, 3), FitJob(init, owner, x, y, fixed, 2)]


def test_a_fit_in_the_child_gives_the_keys_of_this_thread_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(learner_mod, "MIN_STEPS", 7)  # a knob set here reaches the child (240 steps would differ)
    jobs = _jobs(np.random.default_rng(0))
    here = fit_keys_many(jobs)
    there = fit_keys_many(jobs, in_child=True)
    assert len(there) == 2
    for a, b, j in zip(here, there, jobs):
        assert b.dtype == np.float32 and b.shape == j.init.shape
        assert np.array_equal(a, b)
        assert not np.allclose(a, j.init)  # the fit moved the keys
    monkeypatch.setattr(learner_mod, "MIN_STEPS", 240)
    assert not np.array_equal(fit_keys_many(jobs[:1], in_child=True)[0], here[0])


@pytest.mark.parametrize("payload", ["nan", "shape", "none"])
def test_bad_keys_from_the_child_are_refused_and_the_fit_runs_here(
    payload: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "smoa_bad_fit.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np

        def main(directory):
            if {payload!r} == "none":
                return  # exits 0 without its keys
            keys = np.full((8, 32), np.nan, np.float32) if {payload!r} == "nan" else np.zeros((3, 32), np.float32)
            np.savez(Path(directory) / "result.npz", **{{"0": keys}})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # the child's PYTHONPATH is this process's sys.path
    monkeypatch.setattr(learner_mod, "_FIT_ENTRY", "smoa_bad_fit:main")
    monkeypatch.setattr(learner_mod, "MIN_STEPS", 5)
    jobs = _jobs(np.random.default_rng(1))[:1]
    with caplog.at_level("WARNING", logger="smoa.routing.learner"):
        got = fit_keys_many(jobs, in_child=True)
    assert "key fit in a child process failed" in caplog.text
    assert np.array_equal(got[0], fit_keys_many(jobs)[0])


def test_without_a_child_process_the_fit_runs_here(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    import subprocess

    def refuse(*a, **k):
        raise PermissionError("no processes in this sandbox")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(learner_mod, "MIN_STEPS", 5)
    jobs = _jobs(np.random.default_rng(2))
    with caplog.at_level("WARNING", logger="smoa.routing.learner"):
        got = fit_keys_many(jobs, in_child=True)
    assert "no processes in this sandbox" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(got, fit_keys_many(jobs)))


def test_the_projection_tuned_in_the_child_is_the_one_tuned_here_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = rng.integers(0, 5, 300)
    keys = rng.standard_normal((10, 24)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    cols = np.repeat(np.arange(5), 2)
    base = (rng.standard_normal((16, 24)) * 0.1).astype(np.float32)
    here = learner_mod.tune_projection_weights(x, y, keys, cols, base, 2)
    there = learner_mod._tune_in_child(x, y, keys, cols, base, 2)
    assert np.array_equal(here[0], there[0]) and here[1] == there[1]
    assert not np.allclose(here[0], base)  # tuned


def test_the_refit_fits_in_a_child_and_a_create_in_this_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = learner_mod._fit_in_child

    def counted(jobs):
        calls.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(learner_mod, "_fit_in_child", counted)
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=False)
    assert router.statistics()["learned_adapters"] == len(TOPICS)
    assert calls == []  # the creates' fits ran in this thread
    before = {k: router.key_vectors(k).copy() for k in names}
    router.refit()
    assert calls == [2]  # one child, both folds
    monkeypatch.setattr(learner_mod, "FIT_IN_CHILD", False)
    router.refit()  # the same refit in this thread: the same keys
    assert calls == [2]
    after = {k: router.key_vectors(k) for k in names}
    assert any(not np.array_equal(before[k], after[k]) for k in names)
    assert router.route("bake bread loaf oven").adapter_ids[0] == "bread"


def test_the_refit_tunes_the_projection_in_a_child_as_it_would_here(monkeypatch: pytest.MonkeyPatch) -> None:
    tuned: list[int] = []
    real = learner_mod._tune_in_child

    def counted(*a):
        tuned.append(len(a[0]))
        return real(*a)

    monkeypatch.setattr(learner_mod, "_tune_in_child", counted)
    router, _ = fast_router(budget=1000.0)
    router.refit()
    assert len(tuned) == 1
    there = (router._learner.projection.copy(), router._learner.cascade_margin)
    monkeypatch.setattr(learner_mod, "FIT_IN_CHILD", False)
    again, _ = fast_router(budget=1000.0)
    again.refit()
    assert len(tuned) == 1
    assert np.array_equal(there[0], again._learner.projection) and there[1] == again._learner.cascade_margin
