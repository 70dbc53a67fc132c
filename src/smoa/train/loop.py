"""One plain training loop for one adapter on a frozen base model (no trainer framework).

::

    data ──tokenize once──► examples [(ids, labels)]          labels = -100 where no loss is taken
                                 │  seeded shuffle, cycled in epochs
                                 ▼
    for step in range(steps):   batch [B, T] (right-padded)
        logits = model(batch) under the mixture [(trainable copy of the adapter, 1.0)]
        loss   = mean cross-entropy over the batch's target tokens
        loss.backward();  clip;  AdamW step on the adapter's A and B only;  lr: warmup -> cosine

Only clones of the adapter's factors require grad: the base model's parameters are frozen for the duration
(their ``requires_grad`` flags are restored afterwards) and the input :class:`LoraWeights` is never modified.
The base model runs in eval mode (no dropout), so a seed fixes everything: the same seed, data and weights
give bit-identical factors on the same machine and torch build.

Data items: a text (loss on every token), an ``(input, target)`` pair of texts (loss on the target's tokens
only; the target is tokenized without special tokens and appended to the input's ids), or the same two forms
as lists of token ids (for models without a tokenizer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from smoa.adapter.weights import LoraWeights
from smoa.errors import InvalidInputError

IGNORE = -100
Example = tuple[list[int], list[int]]  # (input ids, labels)


@dataclass
class TrainHistory:
    """What a training run did.

    Attributes:
        losses: the training loss of every step (mean token cross-entropy of its batch).
        lrs: the learning rate of every step.
        seconds: wall time of the steps (tokenization excluded).
        tokens: target tokens seen (with repetition).
        examples: distinct training examples after tokenization.
        seed: the seed used.
    """

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    examples: int = 0
    seed: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def initial_loss(self) -> float:
        """Mean loss of the first 10 % of the steps (at least one)."""
        n = max(1, len(self.losses) // 10)
        return float(sum(self.losses[:n]) / n) if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10 % of the steps (at least one)."""
        n = max(1, len(self.losses) // 10)
        return float(sum(self.losses[-n:]) / n) if self.losses else math.nan


# -- data ------------------------------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    if tokenizer is None:
        raise InvalidInputError("text training data needs a tokenizer; pass token-id lists or attach one")
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _is_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def tokenize_example(item: Any, tokenizer: Any, max_length: int, index: int = 0) -> Example | None:
    """One data item -> ``(ids, labels)`` truncated to ``max_length`` tokens; ``None`` if nothing is left to learn.

    Args:
        item: a text, an ``(input, target)`` pair of texts, a token-id list, or a pair of token-id lists.
        tokenizer: a HF tokenizer (for texts).
        max_length: keep at most this many tokens (from the left).
        index: position of the item in the data (for error messages).

    Returns:
        ``(ids, labels)`` of equal length; labels are ``-100`` on the input part of a pair.
    """
    if isinstance(item, str):
        ids = _ids(tokenizer, item, special=True)
        labels = list(ids)
    elif _is_ids(item) and item:
        ids, labels = list(item), list(item)
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        src, tgt = item
        if isinstance(src, str) and isinstance(tgt, str):
            src_ids, tgt_ids = _ids(tokenizer, src, special=True), _ids(tokenizer, tgt, special=False)
        elif _is_ids(src) and _is_ids(tgt):
            src_ids, tgt_ids = list(src), list(tgt)
        else:
            raise InvalidInputError(f"`data[{index}]` pair must hold two texts or two token-id lists, got {item!r:.100}")
        ids = src_ids + tgt_ids
        labels = [IGNORE] * len(src_ids) + tgt_ids
    else:
        raise InvalidInputError(
            f"`data[{index}]` must be a text, an (input, target) pair or token ids, got {type(item).__name__}: {item!r:.80}"
        )
    ids, labels = ids[:max_length], labels[:max_length]
    # the first label is never predicted (no token before it): something must remain after it
    if sum(1 for y in labels[1:] if y != IGNORE) == 0:
        return None
    return ids, labels


def tokenize_data(data: Sequence[Any], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize every item (see :func:`tokenize_example`); items with no target token left are dropped.

    Raises:
        InvalidInputError: ``data`` is empty, malformed, or nothing is left after truncation.
    """
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence) or len(data) == 0:
        raise InvalidInputError(f"`data` must be a non-empty list of texts or (input, target) pairs, got {data!r:.80}")
    out = [ex for i, item in enumerate(data) if (ex := tokenize_example(item, tokenizer, max_length, i)) is not None]
    if not out:
        raise InvalidInputError(f"`data`: no example has a target token left within `max_length`={max_length}")
    return out


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, labels)`` pairs.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: ``[B, T]`` long tensors (labels ``-100`` on padding).
    """
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for r, (x, y) in enumerate(batch):
        ids[r, : len(x)] = torch.tensor(x)
        mask[r, : len(x)] = 1
        labels[r, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Indices of ``steps`` batches: seeded permutations of ``range(n)``, cycled epoch after epoch."""
    pool: list[int] = []
    for _ in range(steps):
        while len(pool) < batch_size:
            pool += torch.randperm(n, generator=generator).tolist() if n > 1 else [0]
        yield pool[:batch_size]
        pool = pool[batch_size:]


# -- maths -----------------------------------------------------------------------------------------------------
def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled tokens of a batch.

    Args:
        logits: ``[B, T, vocab]``.
        labels: ``[B, T]``; ``-100`` = no loss.

    Returns:
        ``(loss, number of target tokens)``.
    """
    target = labels[:, 1:]  # [B, T-1]
    pred = logits[:, :-1].float()  # [B, T-1, vocab]
    n = int((target != IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
    return loss, n


def lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@contextmanager
def _frozen_eval(model: torch.nn.Module) -> Iterator[None]:
    """Freeze every model parameter and switch to eval mode; both restored on exit."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        model.train(was_training)


def _check_args(steps: int, lr: float, batch_size: int, max_length: int, seed: int) -> None:
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("max_length", max_length, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"`{name}` must be an int >= {low}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidInputError(f"`seed` must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InvalidInputError(f"`lr` must be a positive finite number, got {lr!r}")


# -- the loop --------------------------------------------------------------------------------------------------
def train_adapter_weights(
    engine: Any,
    weights: LoraWeights,
    data: Sequence[Any],
    steps: int = 100,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int = 128,
    progress: bool = True,
    *,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    grad_clip: float = 1.0,
    description: str = "training",
) -> tuple[LoraWeights, TrainHistory]:
    """Train a copy of ``weights`` on ``data`` with the base model of ``engine`` frozen.

    Args:
        engine: an :class:`~smoa.inject.engine.InferenceEngine` (model with mixture layers + tokenizer).
        weights: the adapter's starting factors (not modified); its modules must be attached in ``engine``.
        data: texts, ``(input, target)`` text pairs, or their token-id forms (see the module docstring).
        steps: optimiser steps.
        lr: peak AdamW learning rate.
        batch_size: examples per step.
        seed: fixes the batch order (the only randomness).
        max_length: tokens kept per example.
        progress: show a tqdm bar with the running loss.
        weight_decay: AdamW decoupled weight decay.
        warmup: warmup steps (default 5 % of ``steps``, at least 1).
        grad_clip: clip the global gradient norm to this (0 = off).
        description: label of the progress bar.

    Returns:
        ``(trained weights, history)``: new float tensors of the input's dtype, detached, on the input's device.

    Raises:
        InvalidInputError: bad arguments or data.
        ProfileMismatchError: the adapter does not fit the attached modules.
    """
    _check_args(steps, lr, batch_size, max_length, seed)
    if not isinstance(weights, LoraWeights):
        raise InvalidInputError(f"`weights` must be a LoraWeights, got {type(weights).__name__}")
    tokenizer = getattr(engine, "tokenizer", None)
    examples = tokenize_data(data, tokenizer, max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)
    device = engine.device
    dtype = next(iter(weights.factors.values()))[0].dtype
    factors = {m: (a.detach().to(device, torch.float32).clone().requires_grad_(True),
                   b.detach().to(device, torch.float32).clone().requires_grad_(True))
               for m, (a, b) in weights.factors.items()}  # fmt: skip
    live = LoraWeights(factors, weights.alpha, weights.rank)
    params = [t for pair in factors.values() for t in pair]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    warm = max(1, steps // 20) if warmup is None else max(0, int(warmup))
    gen = torch.Generator().manual_seed(seed)
    history = TrainHistory(examples=len(examples), seed=seed)
    bar = _progress(steps, description, progress)
    t0 = time.perf_counter()
    try:
        with _frozen_eval(engine.model), engine.use([(live, 1.0)]):
            for step, idx in enumerate(batch_order(len(examples), batch_size, steps, gen)):
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
                step_lr = lr_at(step, steps, lr, warm)
                for group in opt.param_groups:
                    group["lr"] = step_lr
                logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, n_tok = causal_lm_loss(logits, batch["labels"])  # logits: [B, T, vocab]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                history.losses.append(float(loss.detach()))
                history.lrs.append(step_lr)
                history.tokens += n_tok
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{history.losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - t0
    out = {m: (a.detach().to(weights.factors[m][0].device, dtype).clone(),
               b.detach().to(weights.factors[m][1].device, dtype).clone())
           for m, (a, b) in factors.items()}  # fmt: skip
    return LoraWeights(out, weights.alpha, weights.rank), history


def _progress(total: int, description: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)


def evaluate_loss(engine: Any, weights: LoraWeights | None, data: Sequence[Any], batch_size: int = 8, max_length: int = 128) -> float:
    """Mean target-token cross-entropy of ``data`` under ``weights`` (``None`` = the base model), no grad.

    Tokens are pooled over the whole data (a long text weighs more than a short one).
    """
    tokenizer = getattr(engine, "tokenizer", None)
    examples = tokenize_data(data, tokenizer, max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)
    total, count = 0.0, 0
    mixture = [] if weights is None else [(weights, 1.0)]
    with torch.no_grad(), engine.use(mixture):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            logits = engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, n = causal_lm_loss(logits, batch["labels"])
            total += float(loss) * n
            count += n
    return total / max(count, 1)


__all__ = ["TrainHistory", "causal_lm_loss", "collate", "evaluate_loss", "tokenize_data", "train_adapter_weights"]
