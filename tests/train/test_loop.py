"""The plain training loop on a tiny Llama: loss goes down, determinism, frozen base, target-only loss, and one
step checked against a real PEFT model and torch's own AdamW."""

from __future__ import annotations

import copy

import pytest
import torch

from smoa.adapter.profile import profile_from_model
from smoa.adapter.weights import LoraWeights, init_lora
from smoa.errors import InvalidInputError
from smoa.inject.engine import InferenceEngine
from smoa.train.loop import (
    IGNORE,
    batch_order,
    causal_lm_loss,
    collate,
    evaluate_loss,
    lr_at,
    tokenize_data,
    tokenize_example,
    train_adapter_weights,
)

from .helpers import TOPICS, tiny_llama


def _start(model, rank: int = 4, seed: int = 0, b_scale: float = 0.0) -> LoraWeights:
    """Fresh factors on every linear module of the tiny Llama (profile read from an unattached copy)."""
    prof = profile_from_model(tiny_llama())
    w = init_lora(prof, prof.module_names, rank, 2.0 * rank, torch.Generator().manual_seed(seed))
    if b_scale:
        g = torch.Generator().manual_seed(seed + 1)
        w = LoraWeights({m: (a, torch.randn(b.shape, generator=g) * b_scale) for m, (a, b) in w.items()}, w.alpha, w.rank)
    return w


def _same(x: LoraWeights, y: LoraWeights) -> bool:
    return list(x) == list(y) and all(torch.equal(x[m][0], y[m][0]) and torch.equal(x[m][1], y[m][1]) for m in x)


def test_loss_goes_down(model, tokenizer) -> None:
    engine = InferenceEngine(model, tokenizer)
    train, held = TOPICS["cooking"][:4], TOPICS["cooking"][4:]
    start = _start(model)
    base_train = evaluate_loss(engine, None, train)
    assert evaluate_loss(engine, start, held) == pytest.approx(evaluate_loss(engine, None, held), abs=1e-6)  # B = 0
    trained, hist = train_adapter_weights(engine, start, train, steps=60, lr=1e-2, batch_size=4, progress=False)
    assert hist.steps == 60 and len(hist.lrs) == 60 and hist.tokens == 60 * 22 and hist.examples == 4
    assert hist.final_loss < hist.initial_loss - 0.8  # a random 2-layer model learns slowly through LoRA (as PEFT)
    assert evaluate_loss(engine, trained, train) < base_train - 0.8
    assert not any(torch.equal(trained[m][1], start[m][1]) for m in start)  # B moved everywhere


def test_same_seed_bit_identical_other_seed_differs(model, tokenizer) -> None:
    engine = InferenceEngine(model, tokenizer)
    data = TOPICS["weather"] + TOPICS["finance"]
    runs = [train_adapter_weights(engine, _start(model), data, steps=6, lr=1e-2, batch_size=3, seed=s, progress=False)
            for s in (7, 7, 8)]  # fmt: skip
    assert _same(runs[0][0], runs[1][0]) and runs[0][1].losses == runs[1][1].losses
    assert not _same(runs[0][0], runs[2][0])


def test_base_input_weights_and_flags_untouched(model, tokenizer) -> None:
    engine = InferenceEngine(model, tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    start = _start(model, b_scale=0.1)
    keep = start.clone()
    model.train()
    trained, _ = train_adapter_weights(engine, start, TOPICS["weather"], steps=5, lr=1e-2, batch_size=2, progress=False)
    assert model.training  # mode restored
    assert _same(start, keep)  # the input weights are never modified
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not t.requires_grad for pair in trained.factors.values() for t in pair)
    assert trained.alpha == start.alpha and trained.rank == start.rank


def test_pairs_take_loss_on_target_tokens_only(tokenizer) -> None:
    ids, labels = tokenize_example(("stir the soup", "and add salt"), tokenizer, max_length=64)
    src = tokenizer("stir the soup")["input_ids"]
    tgt = tokenizer("and add salt", add_special_tokens=False)["input_ids"]
    assert ids == src + tgt and labels == [IGNORE] * len(src) + tgt
    assert tokenize_example(("stir the soup", "and add salt"), tokenizer, max_length=len(src)) is None  # target cut
    assert tokenize_example([5, 6, 7], None, 2) == ([5, 6], [5, 6])
    assert tokenize_example(([5, 6], [7]), None, 8) == ([5, 6, 7], [IGNORE, IGNORE, 7])
    # the loss: mean cross-entropy over the labelled positions only, checked against a manual computation
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([[1, 2, IGNORE, 4, 5], [IGNORE, IGNORE, 3, 3, IGNORE]])
    loss, n = causal_lm_loss(logits, lab)
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[b, t - 1, lab[b, t]] for b in range(2) for t in range(1, 5) if lab[b, t] != IGNORE]
    assert n == len(terms) == 5
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_pair_training_lowers_target_loss(model, tokenizer) -> None:
    engine = InferenceEngine(model, tokenizer)
    pairs = [(t.rsplit(" ", 2)[0], " ".join(t.split()[-2:])) for t in TOPICS["finance"]]
    start = _start(model)
    before = evaluate_loss(engine, None, pairs)
    trained, hist = train_adapter_weights(engine, start, pairs, steps=30, lr=2e-2, batch_size=5, progress=False)
    assert evaluate_loss(engine, trained, pairs) < before - 0.8
    assert hist.tokens == 30 * 10  # 5 pairs x 2 target tokens per step


def test_one_step_matches_peft_and_torch_adamw(model, tokenizer) -> None:
    """First AdamW step == torch AdamW applied to the gradient of the same loss through a real PEFT model."""
    from peft import LoraConfig, get_peft_model

    start = _start(model, rank=2, b_scale=0.05)
    data = TOPICS["weather"][:3]
    lr = 1e-3
    trained, hist = train_adapter_weights(InferenceEngine(copy.deepcopy(model), tokenizer), start, data, steps=1,
                                          lr=lr, batch_size=3, warmup=0, grad_clip=0.0, progress=False)  # fmt: skip
    ref = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=list(start), lora_dropout=0.0))
    params = []
    for name, module in ref.named_modules():
        short = name.removeprefix("base_model.model.")
        if short in start.factors and hasattr(module, "lora_A"):
            a, b = start[short]
            module.lora_A["default"].weight.data.copy_(a)
            module.lora_B["default"].weight.data.copy_(b)
            params += [(short, module.lora_A["default"].weight, module.lora_B["default"].weight)]
    assert len(params) == len(start)
    batch = collate(tokenize_data(data, tokenizer, 128), tokenizer.pad_token_id)
    logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lab = batch["labels"]
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                                 ignore_index=IGNORE)  # fmt: skip
    assert hist.losses[0] == pytest.approx(float(ref_loss), rel=1e-5)
    opt = torch.optim.AdamW([p for _, a, b in params for p in (a, b)], lr=lr, weight_decay=0.0)
    ref_loss.backward()
    opt.step()
    for short, a, b in params:
        torch.testing.assert_close(trained[short][0], a.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(trained[short][1], b.detach(), rtol=1e-4, atol=1e-6)


def test_schedule_and_batch_order() -> None:
    lrs = [lr_at(s, 100, 1.0, 5) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:]))
    order = list(batch_order(5, 2, 5, torch.Generator().manual_seed(0)))
    flat = [i for b in order for i in b]
    assert all(len(b) == 2 for b in order) and sorted(flat[:5]) == [0, 1, 2, 3, 4]  # an epoch is a permutation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"steps": 0}, "steps"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"),
     ({"max_length": 1}, "max_length"), ({"seed": 1.5}, "seed")],
)  # fmt: skip
def test_bad_arguments_name_the_field(model, tokenizer, kwargs, field) -> None:
    engine = InferenceEngine(model, tokenizer)
    with pytest.raises(InvalidInputError, match=f"`{field}`"):
        train_adapter_weights(engine, _start(model), ["rain"], progress=False, **kwargs)


def test_bad_data(model, tokenizer) -> None:
    engine = InferenceEngine(model, tokenizer)
    for bad in ([], "rain falls", [3.5], [("a", 1)]):
        with pytest.raises(InvalidInputError, match="data"):
            train_adapter_weights(engine, _start(model), bad, steps=1, progress=False)
    with pytest.raises(InvalidInputError, match="no example has a target token"):
        train_adapter_weights(engine, _start(model), ["rain"], steps=1, progress=False)  # one token: nothing to predict
