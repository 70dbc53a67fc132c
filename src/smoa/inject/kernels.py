"""The mixture kernels: pure tensor functions adding LoRA updates to a base layer's output.

Every kernel receives the base output ``y`` (computed once, by the untouched base layer) and adds per row
``sum_i w_i * s_i * B_i (A_i x)`` over that row's adapters. The weights ``w_i`` and scalings ``s_i = alpha_i /
r_i`` are folded into the rows of a concatenated ``A`` (see :func:`concat_factors`), which is exact: stacking
the k adapters' ranks side by side gives one LoRA of rank ``sum_i r_i`` whose product is the weighted sum of
the k updates, with no cross terms::

    A_cat = [w_1 s_1 A_1; ...; w_k s_k A_k]   [R, d_in],  R = r_1 + ... + r_k
    B_cat = [B_1, ..., B_k]                   [d_out, R]
    B_cat (A_cat x) = sum_i w_i s_i B_i (A_i x)

Three ways to apply them to a batch (``x: [batch, T, d_in]``, ``y: [batch, T, d_out]``):

* :func:`lora_shared` - the whole batch uses one mixture: two dense matmuls over all tokens.
* :func:`lora_sgmv` - a few groups of rows share a mixture each (segmented gather matrix-vector, SGMV):
  one pair of matmuls per group.
* :func:`lora_bgmv` - many rows with different mixtures (batched gather matrix-vector, BGMV): every row
  gathers its slot's stacked factors and one ``bmm`` pair covers the batch; slot ``-1`` is "no adapter".

Ranks of different slots are zero-padded to a common ``R``: padded rows of ``A`` give zero activations that
meet zero columns of ``B``, so the padding adds exact zeros.

When gradients are enabled the kernels add out of place (``y + delta``), otherwise in place into ``y``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Group = tuple[torch.Tensor | slice, torch.Tensor, torch.Tensor]


def concat_factors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate k adapters' factors of one module into one exact LoRA.

    Pseudo-loop::

        A_cat = cat([coef_i * A_i for i in range(k)], dim=0)   # [R, d_in]
        B_cat = cat([B_i for i in range(k)], dim=1)            # [d_out, R]

    Args:
        pairs: ``(A_i [r_i, d_in], B_i [d_out, r_i], coef_i)`` with ``coef_i = w_i * alpha_i / r_i``.

    Returns:
        ``(A_cat [R, d_in], B_cat [d_out, R])`` with ``R = sum r_i``. Differentiable in the factors.
    """
    a_cat = torch.cat([a * coef for a, _, coef in pairs], dim=0)  # [R, d_in]
    b_cat = torch.cat([b for _, b, _ in pairs], dim=1)  # [d_out, R]
    return a_cat, b_cat


def pad_stack(mats: Sequence[torch.Tensor], dim: int, size: int) -> torch.Tensor:
    """Stack 2-D tensors after zero-padding dimension ``dim`` to ``size`` (the rank axis).

    Args:
        mats: ``S`` tensors, equal except along ``dim``.
        dim: 0 for ``A`` factors (``[r, d_in]``), 1 for ``B`` factors (``[d_out, r]``).
        size: the padded rank ``R >= max r``.

    Returns:
        ``[S, R, d_in]`` for ``dim=0``, ``[S, d_out, R]`` for ``dim=1``.
    """
    padded = []
    for m in mats:
        short = size - m.shape[dim]
        if short:
            pad = (0, 0, 0, short) if dim == 0 else (0, short)
            m = torch.nn.functional.pad(m, pad)
        padded.append(m)
    return torch.stack(padded)


def _add(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (y.requires_grad or delta.requires_grad):
        return y + delta
    return y.add_(delta)


def lora_shared(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One LoRA for every row and token.

    Pseudo-loop::

        for n in range(N):                     # every token of every row
            y[n] += b @ (a @ x[n])

    Args:
        x: ``[..., d_in]`` layer input.
        y: ``[..., d_out]`` base output (updated in place unless gradients are enabled).
        a: ``[R, d_in]`` (mixing weights and scalings folded in), b: ``[d_out, R]``.

    Returns:
        ``[..., d_out]`` base output plus the update.
    """
    h = x @ a.T  # [..., R]
    if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or b.requires_grad):
        return y + h @ b.T
    if not y.is_contiguous():
        return y.add_(h @ b.T)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T)  # [N, d_out] += [N, R] @ [R, d_out]
    return y


def lora_sgmv(x: torch.Tensor, y: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
    """A few groups of rows, each with its own LoRA (segmented gather matrix-vector).

    Pseudo-loop::

        for rows, a, b in groups:
            for r in rows:
                for t in range(T):
                    y[r, t] += b @ (a @ x[r, t])

    Rows in no group keep the base output (the "no adapter" rows).

    Args:
        x: ``[batch, T, d_in]``.
        y: ``[batch, T, d_out]`` base output.
        groups: ``(rows, a [R_g, d_in], b [d_out, R_g])``; ``rows`` is a ``slice`` (a contiguous segment: no
            copy of ``x``) or a 1-D long tensor of row indices. Groups must not share rows.

    Returns:
        ``[batch, T, d_out]``.
    """
    grad = torch.is_grad_enabled()
    for rows, a, b in groups:
        delta = (x[rows] @ a.T) @ b.T  # [n_g, T, d_out]
        if grad and (y.requires_grad or delta.requires_grad):
            y = y.index_add(0, _as_index(rows, y.device), delta)
        elif isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)
    return y


def bgmv_indices(row_slots: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split per-row slots (``-1`` = no adapter) into :func:`lora_bgmv`'s ``(slot, rows)`` (done once per plan).

    Args:
        row_slots: ``[batch]`` long.

    Returns:
        ``slot`` ``[b_act]`` (``None`` when the active rows use slots ``0, 1, 2, ...`` in order: no gather) and
        ``rows`` ``[b_act]`` (``None`` when every row is active).
    """
    active = row_slots >= 0
    if bool(active.all()):
        rows, slot = None, row_slots
    else:
        rows = active.nonzero().squeeze(1)
        slot = row_slots.index_select(0, rows)
    if torch.equal(slot, torch.arange(slot.numel(), device=slot.device)):
        return None, rows
    return slot, rows


def lora_bgmv(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    slot: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row LoRA gathered from stacked slots (batched gather matrix-vector).

    Pseudo-loop::

        active = rows if rows is not None else range(batch)   # rows left out: explicit "no adapter"
        for j, r in enumerate(active):
            s = slot[j] if slot is not None else j
            for t in range(T):
                y[r, t] += b_stack[s] @ (a_stack[s] @ x[r, t])

    Args:
        x: ``[batch, T, d_in]``.
        y: ``[batch, T, d_out]`` base output.
        a_stack: ``[S, R, d_in]``, b_stack: ``[S, d_out, R]`` (ranks zero-padded to ``R``).
        slot: ``[b_act]`` long slot of each active row; ``None``: slot ``j`` for the ``j``-th active row.
        rows: ``[b_act]`` long indices of the active rows; ``None``: every row. (See :func:`bgmv_indices`.)

    Returns:
        ``[batch, T, d_out]``.
    """
    xs = x if rows is None else x.index_select(0, rows)  # [b_act, T, d_in]
    a_rows = a_stack if slot is None else a_stack.index_select(0, slot)  # [b_act, R, d_in]
    b_rows = b_stack if slot is None else b_stack.index_select(0, slot)  # [b_act, d_out, R]
    h = torch.bmm(xs, a_rows.transpose(1, 2))  # [b_act, T, R]
    grad = torch.is_grad_enabled() and (y.requires_grad or h.requires_grad or b_rows.requires_grad)
    if rows is None:
        if grad:
            return y + torch.bmm(h, b_rows.transpose(1, 2))
        return y.baddbmm_(h, b_rows.transpose(1, 2))  # [b, T, d_out] += [b, T, R] @ [b, R, d_out]
    delta = torch.bmm(h, b_rows.transpose(1, 2))  # [b_act, T, d_out]
    return y.index_add(0, rows, delta) if grad else y.index_add_(0, rows, delta)


def reference_delta(
    x: torch.Tensor, mixtures: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor, float]]]
) -> torch.Tensor:
    """Slow, obviously-correct per-row update, for tests.

    Pseudo-loop::

        for r in range(batch):
            for A, B, coef in mixtures[r]:
                delta[r] += coef * (x[r] @ A.T) @ B.T

    Args:
        x: ``[batch, T, d_in]``.
        mixtures: per row, ``(A [r, d_in], B [d_out, r], coef)`` triples (empty: no adapter).

    Returns:
        ``[batch, T, d_out]`` (float64 accumulation, cast back to ``x.dtype``).
    """
    d_out = next((b.shape[0] for mix in mixtures for _, b, _ in mix), 0)
    out = torch.zeros(x.shape[0], x.shape[1], d_out, dtype=torch.float64, device=x.device)
    for r, mix in enumerate(mixtures):
        for a, b, coef in mix:
            out[r] += coef * (x[r].double() @ a.double().T) @ b.double().T
    return out.to(x.dtype)


def _as_index(rows: torch.Tensor | slice, device: torch.device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows
