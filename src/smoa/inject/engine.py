"""`InferenceEngine`: a base model with mixture layers attached, driven by texts or token ids.

This is the contract the :class:`smoa.SparseAdapterMixture` facade calls: it turns routes into mixtures
(looking weights up in the library) and hands them here with the requests::

    Mixture = list[(LoraWeights, weight)] or list[(key, LoraWeights, weight)]     # [] = base model

    engine = InferenceEngine(model, tokenizer)
    out = engine.forward(["first request", "second"], [[(w1, .6), (w2, .4)], []])   # per-row mixtures
    texts = engine.generate(["Hello"], [(w1, 1.0)], max_new_tokens=16)           # one shared mixture
    nll = engine.loss(texts, mixtures)                                            # [batch] mean token NLL

``key`` (e.g. ``(adapter_id, version)``) lets the stacking cache reuse work across reloaded copies of the
same adapter; without it the object's identity is used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from smoa.adapter.profile import BaseProfile
from smoa.errors import ConfigError, InvalidInputError
from smoa.inject.attach import MixtureHandle, attach
from smoa.inject.plan import Mixture
from smoa.textcheck import validate_texts

Inputs = list[str] | torch.Tensor | list[list[int]]
_MAX_CHARS_PER_TOKEN = 64  # texts are cut to context * this many characters before tokenizing

__all__ = ["InferenceEngine", "Mixture"]


class InferenceEngine:
    """Run a model under per-request LoRA mixtures.

    Args:
        model: a causal LM (HF ``*ForCausalLM``) or any module taking ``input_ids`` / ``attention_mask``.
        tokenizer: needed for text inputs and text outputs; a missing pad token is set to the EOS token.
        target_modules: PEFT-style patterns of the layers to attach to; ``None`` = every linear layer but the head.
        device: move the model there first (``None``: leave it where it is).
        **attach_kwargs: passed to :func:`smoa.inject.attach` (``kernel``, ``cache_bytes``, ...).

    Attributes:
        profile: the attached modules; every adapter must fit it.
        handle: the :class:`~smoa.inject.attach.MixtureHandle`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any | None = None,
        target_modules: str | Sequence[str] | None = None,
        device: str | None = None,
        **attach_kwargs: Any,
    ) -> None:
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
            eos = getattr(tokenizer, "eos_token", None)
            if eos is None:
                raise ConfigError("`tokenizer` has neither a pad token nor an EOS token to pad with")
            tokenizer.pad_token = eos
        self.handle: MixtureHandle = attach(model, target_modules, **attach_kwargs)
        self.profile: BaseProfile = self.handle.profile

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (``config.max_position_embeddings`` / ``n_positions``), if it says."""
        cfg = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # -- inputs --------------------------------------------------------------------------------------------------
    def encode(
        self, inputs: Inputs, padding_side: str = "right", max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"input_ids": [batch, T], "attention_mask": [batch, T]}`` on the model's device.

        Texts are tokenized (``tokenizer`` required); lists of token ids are padded with the pad token id (0
        without a tokenizer); a tensor is taken as is, with an all-ones mask. Texts and id lists are cut to
        ``max_length`` and never beyond the model's :attr:`context_length`.

        Raises:
            InvalidInputError: bad types, a text with a lone surrogate, or a text that tokenizes to no token.
        """
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 2:
                raise InvalidInputError(
                    f"`inputs` tensor must be [batch, T] token ids, got shape {tuple(inputs.shape)}"
                )
            ids = inputs.to(self.device)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise InvalidInputError(f"`inputs` must be a non-empty list of texts or token-id lists, got {inputs!r:.80}")
        limit = self.context_length if max_length is None else min(max_length, self.context_length or max_length)
        if all(isinstance(t, str) for t in inputs):
            if self.tokenizer is None:
                raise InvalidInputError("text `inputs` need a tokenizer; pass `tokenizer=` to the engine")
            texts = validate_texts(list(inputs), "inputs")  # a lone surrogate: InvalidInputError, not TypeError
            if limit is not None:  # a 1 MB text must not reach the tokenizer whole (no token is 64 chars long)
                texts = [t[: limit * _MAX_CHARS_PER_TOKEN] for t in texts]
            tok = self.tokenizer
            old_side = tok.padding_side
            tok.padding_side = padding_side
            try:
                enc = tok(texts, return_tensors="pt", padding=True, truncation=limit is not None, max_length=limit)
            finally:
                tok.padding_side = old_side
            _refuse_empty_rows(enc["attention_mask"])
            return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        if all(isinstance(t, (list, tuple)) and t and all(isinstance(i, int) for i in t) for t in inputs):
            return self._pad_ids([list(t)[:limit] for t in inputs], padding_side)
        raise InvalidInputError("`inputs` must be all texts or all non-empty lists of int token ids")

    def _pad_ids(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        pad_id = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        pad_id = 0 if pad_id is None else int(pad_id)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @staticmethod
    def _check_rows(mixtures: Any, batch: int) -> None:
        from smoa.inject.plan import normalize_batch

        _, rows = normalize_batch(mixtures)
        if rows is not None and len(rows) != batch:
            raise InvalidInputError(f"`mixtures` has {len(rows)} per-row mixtures for {batch} inputs")

    # -- running -------------------------------------------------------------------------------------------------
    @contextmanager
    def use(self, mixtures: list[Mixture] | Mixture | None) -> Iterator[None]:
        """Run arbitrary model code under ``mixtures`` (per row, or one shared); restored on exit."""
        with self.handle.use(mixtures):
            yield

    def forward(self, inputs: Inputs, mixtures: list[Mixture] | Mixture | None, **model_kwargs: Any) -> Any:
        """One forward pass; rows are right-padded (``attention_mask`` in the batch).

        Args:
            inputs: texts, token-id lists, or an ``[batch, T]`` id tensor.
            mixtures: one mixture per row, or one mixture for every row.
            **model_kwargs: passed to the model (``output_hidden_states``, ...).

        Returns:
            The model's output (``.logits``: ``[batch, T, vocab]``).
        """
        batch = self.encode(inputs)
        self._check_rows(mixtures, batch["input_ids"].shape[0])
        with self.handle.use(mixtures):
            return self.model(**batch, **model_kwargs)

    def generate(
        self, inputs: Inputs, mixtures: list[Mixture] | Mixture | None, max_new_tokens: int = 32, **gen_kwargs: Any
    ) -> list[str] | torch.Tensor:
        """Generate continuations (greedy unless ``gen_kwargs`` say otherwise); rows are left-padded.

        Returns:
            For text inputs, the decoded new text of every row; otherwise the ``[batch, T + new]`` id tensor
            returned by ``model.generate`` (``num_return_sequences`` / beams expand each row's mixture).
        """
        if max_new_tokens < 1:
            raise InvalidInputError(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}")
        batch = self.encode(inputs, padding_side="left")
        self._check_rows(mixtures, batch["input_ids"].shape[0])
        gen_kwargs.setdefault("do_sample", False)
        pad_id = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad_id is not None:
            gen_kwargs.setdefault("pad_token_id", pad_id)
        with self.handle.use(mixtures), torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, **gen_kwargs)
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], str):
            new = out[:, batch["input_ids"].shape[1] :]
            return list(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return out

    def loss(self, texts: Inputs, mixtures: list[Mixture] | Mixture | None, max_length: int = 256) -> torch.Tensor:
        """Per-row mean next-token negative log-likelihood (differentiable in trainable adapter factors).

        Args:
            texts: texts (truncated to ``max_length`` tokens), token-id lists or an id tensor.
            mixtures: per row, or shared.

        Returns:
            ``[batch]`` float tensor; a row with fewer than 2 tokens gets NaN.
        """
        batch = self.encode(texts, max_length=max_length)
        self._check_rows(mixtures, batch["input_ids"].shape[0])
        with self.handle.use(mixtures):
            logits = self.model(**batch).logits  # [batch, T, vocab]
        return token_nll(logits, batch["input_ids"], batch["attention_mask"])

    def detach(self) -> nn.Module:
        """Remove the mixture layers; returns the original model."""
        return self.handle.detach()


def _refuse_empty_rows(mask: torch.Tensor) -> None:
    """A text that tokenizes to no token has nothing to run on: a clear error instead of a reshape error."""
    empty = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty or mask.shape[1] == 0:
        rows = empty or list(range(mask.shape[0]))
        raise InvalidInputError(
            f"`inputs[{rows[0]}]` tokenizes to no token (empty text); every input needs at least one token"
            + (f" ({len(rows)} empty rows)" if len(rows) > 1 else "")
        )


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per row over its real (unpadded) tokens.

    Args:
        logits: ``[batch, T, vocab]``; input_ids, attention_mask: ``[batch, T]``.

    Returns:
        ``[batch]``.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, T-1, vocab]
    target = input_ids[:, 1:]  # [batch, T-1]
    mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(logp.dtype)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [batch, T-1]
    return (nll * mask).sum(1) / mask.sum(1)
