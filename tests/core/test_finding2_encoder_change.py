"""Finding 2: reopening with another encoder re-encodes every key from the stored routing texts."""

from __future__ import annotations

from pathlib import Path

from smoa.adapter.spec import AdapterSpec

from .conftest import open_core, weights

TOPICS = {
    "cardiology": "heart attack cardiac arrhythmia blood pressure cardiologist",
    "astronomy": "telescope galaxy planets stars orbit nebula",
    "cooking": "recipe oven bake flour sugar kitchen",
    "football": "goal striker penalty league match stadium",
    "taxes": "income tax return deduction audit accountant",
    "gardening": "soil seeds compost tomatoes pruning garden",
    "guitar": "chords strings fretboard strumming amplifier guitar",
    "sailing": "boat sail wind harbour anchor yacht",
    "chemistry": "molecule reaction acid titration laboratory chemist",
    "poetry": "poem verse rhyme stanza sonnet poet",
}


def _top1(core, ids: dict[str, str]) -> int:
    return sum(core.route(text, strategy="semantic", k=1).adapter_ids == [ids[t]] for t, text in TOPICS.items())


def test_reopen_with_another_encoder_reencodes_and_routes_right(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    core = open_core(path, encoder="hash")
    made = core.create_many([AdapterSpec(weights=weights(i), description=text, examples=[text])
                             for i, text in enumerate(TOPICS.values())])  # fmt: skip
    ids = dict(zip(TOPICS, (a.id for a in made)))
    assert _top1(core, ids) == 10
    core.close()

    core = open_core(path, encoder="static")
    assert core.reencoded == 10
    stats = core.statistics()
    assert stats["encoder"] == "static" and core.catalog.get_meta("encoder") == "static"
    assert _top1(core, ids) == 10  # routes on keys made by the encoder in use, never the old one's
    core.close()

    core = open_core(path, encoder="static")  # same encoder again: nothing to re-encode, index reused
    assert core.reencoded == 0 and _top1(core, ids) == 10
    core.close()
