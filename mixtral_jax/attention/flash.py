"""Memory-efficient exact attention in plain JAX: key/value blocks with an online softmax (flash attention).

Never more than one [B, K, G*bq, bk] block of scores is live; the backward pass (custom VJP, FlashAttention-2
order) recomputes each block's scores from q, k and the saved log-sum-exp, so what autodiff keeps for the
backward is q, k, v, the output and one float per query row: memory linear in the sequence length.

Which (query block, key block) pairs are visited is decided from the data before the loops: a pair is
computed only if some row of the batch can see some key of the block by the mask's rules (position order,
segment ranges, sliding window, and, for self-attention, index order). The loops run over the first to the
last such block of each row of blocks (blocks outside that range are never visited: a sliding window's
early blocks and a causal mask's upper triangle cost nothing) and a `lax.cond` skips invisible blocks inside
it (earlier documents of a packed sequence).

The mask is the one of reference.attention_mask: key j is visible from query i when
  seg_i == seg_j,  0 <= pos_i - pos_j (< window),  and (self-attention) index_j <= index_i.
A query row that sees no key at all gets zeros (the reference gives the mean of all values); no row of the
model is ever fully masked (every token sees itself).

Shapes: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, Dh head dim, bq / bk rows per
query / key block, nq / nk blocks, M = G * bq.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_NEG = float(jnp.finfo(jnp.float32).min)
_BIG = np.iinfo(np.int32).max // 2
_PAD_Q_SEG, _PAD_K_SEG = -2, -1  # padded rows: never equal to each other or to a real segment (>= 0)


def _blocks(x: jax.Array, block: int, fill) -> jax.Array:
  """[B, N, ...] -> [nb, B, block, ...], padded with `fill` to a multiple of block."""
  n = x.shape[1]
  nb = -(-n // block)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, nb * block - n)
  x = jnp.pad(x, pad, constant_values=fill)
  return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)


def _block_stats(pos, seg, valid):
  """Per block and batch row, over its real rows: (min pos, max pos, min seg, max seg, any) -> [B, nb] each.
  pos/seg/valid [nb, B, bl]."""
  lo = lambda x: jnp.min(jnp.where(valid, x, _BIG), axis=-1).T  # noqa: E731
  hi = lambda x: jnp.max(jnp.where(valid, x, -_BIG), axis=-1).T  # noqa: E731
  return lo(pos), hi(pos), lo(seg), hi(seg), jnp.any(valid, axis=-1).T


def _visible_blocks(qs, ks, window: Optional[int], causal_self: bool, bq: int, bk: int) -> jax.Array:
  """Bool [nq, nk]: some batch row may see some key of key block j from query block i (conservative)."""
  qpmin, qpmax, qsmin, qsmax, qany = (a[:, :, None] for a in qs)  # [B, nq, 1]
  kpmin, kpmax, ksmin, ksmax, kany = (a[:, None, :] for a in ks)  # [B, 1, nk]
  pred = qany & kany & (kpmin <= qpmax) & (ksmin <= qsmax) & (ksmax >= qsmin)  # [B, nq, nk]
  if window is not None:
    pred &= kpmax > qpmin - window
  pred = jnp.any(pred, axis=0)  # [nq, nk]
  if causal_self:  # index order, known statically: key block j starts after query block i ends
    i, j = np.arange(pred.shape[0])[:, None], np.arange(pred.shape[1])[None, :]
    pred &= jnp.asarray(j * bk <= i * bq + bq - 1)
  return pred


def _full_blocks(qs, ks, window: Optional[int], causal_self: bool, bq: int, bk: int) -> jax.Array:
  """Bool [nq, nk]: in every batch row, every query of block i sees every key of block j (no mask needed:
  whole blocks of one segment, every key before every query and inside the window)."""
  qpmin, qpmax, qsmin, qsmax, _ = (a[:, :, None] for a in qs)  # [B, nq, 1]
  kpmin, kpmax, ksmin, ksmax, _ = (a[:, None, :] for a in ks)  # [B, 1, nk]
  full = (qsmin == qsmax) & (ksmin == ksmax) & (qsmin == ksmin) & (kpmax <= qpmin)  # [B, nq, nk]
  if window is not None:
    full &= kpmin > qpmax - window
  full = jnp.all(full, axis=0)
  if causal_self:
    i, j = np.arange(full.shape[0])[:, None], np.arange(full.shape[1])[None, :]
    full &= jnp.asarray((j + 1) * bk - 1 <= i * bq)
  return full


def _ranges(pred: jax.Array):
  """First and one-past-last true index of each row of pred [n, m] (0, 0 for an all-false row)."""
  m = pred.shape[1]
  idx = jnp.arange(m)
  lo = jnp.min(jnp.where(pred, idx, m), axis=1)
  hi = jnp.max(jnp.where(pred, idx + 1, 0), axis=1)
  return jnp.minimum(lo, hi), hi


def _block_mask(qp, kp, qsg, ksg, qi, ki, window, causal_self):
  """Bool [B, bq, bk]. qp/qsg [B, bq], kp/ksg [B, bk], qi [bq] / ki [bk] global indices."""
  delta = qp[:, :, None] - kp[:, None, :]
  mask = (delta >= 0) & (qsg[:, :, None] == ksg[:, None, :])
  if window is not None:
    mask &= delta < window
  if causal_self:
    mask &= (qi[:, None] >= ki[None, :])[None]
  return mask


class _Layout:
  """Blocks of the inputs, the visit plan and the static sizes; built once per call (fwd and bwd)."""

  def __init__(self, q, k, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k):
    b, t, h, dh = q.shape
    s, kvh = k.shape[1], k.shape[2]
    self.b, self.t, self.s, self.h, self.kvh, self.g, self.dh = b, t, s, h, kvh, h // kvh, dh
    self.bq, self.bk = min(block_q, t), min(block_k, s)
    self.window, self.causal_self = window, causal_self
    ones_q, ones_k = jnp.ones((b, t), bool), jnp.ones((b, s), bool)
    self.qp, self.qsg = _blocks(q_pos, self.bq, 0), _blocks(q_seg, self.bq, _PAD_Q_SEG)  # [nq, B, bq]
    self.kp, self.ksg = _blocks(k_pos, self.bk, 0), _blocks(k_seg, self.bk, _PAD_K_SEG)  # [nk, B, bk]
    qvalid, kvalid = _blocks(ones_q, self.bq, False), _blocks(ones_k, self.bk, False)
    self.nq, self.nk = self.qp.shape[0], self.kp.shape[0]
    qstats, kstats = _block_stats(self.qp, self.qsg, qvalid), _block_stats(self.kp, self.ksg, kvalid)
    self.pred = _visible_blocks(qstats, kstats, window, causal_self, self.bq, self.bk)  # [nq, nk]
    # The stats cover real rows only; a key block with padded rows needs its mask (padded query rows do
    # not: their outputs are dropped and their cotangents are zero).
    padded_keys = np.arange(self.nk) * self.bk + self.bk > s  # [nk], static
    self.full = _full_blocks(qstats, kstats, window, causal_self, self.bq, self.bk) & self.pred & jnp.asarray(
        ~padded_keys)[None, :]

  def q_blocks(self, x):  # [B, T, H, Dh] -> [nq, B, K, M, Dh]
    xb = _blocks(x, self.bq, 0)  # [nq, B, bq, H, Dh]
    xb = xb.reshape(self.nq, self.b, self.bq, self.kvh, self.g, self.dh).transpose(0, 1, 3, 4, 2, 5)
    return xb.reshape(self.nq, self.b, self.kvh, self.g * self.bq, self.dh)

  def q_unblocks(self, xb):  # [nq, B, K, M, Dh] -> [B, T, H, Dh]
    xb = xb.reshape(self.nq, self.b, self.kvh, self.g, self.bq, self.dh).transpose(1, 0, 4, 2, 3, 5)
    return xb.reshape(self.b, self.nq * self.bq, self.h, self.dh)[:, :self.t]

  def kv_blocks(self, x):  # [B, S, K, Dh] -> [nk, B, K, bk, Dh]
    return _blocks(x, self.bk, 0).transpose(0, 1, 3, 2, 4)

  def kv_unblocks(self, xb):  # [nk, B, K, bk, Dh] -> [B, S, K, Dh]
    return xb.transpose(1, 0, 3, 2, 4).reshape(self.b, self.nk * self.bk, self.kvh, self.dh)[:, :self.s]

  def mask(self, i, j):  # [B, 1, G, bq, bk] for query block i, key block j (traced indices)
    qi = i * self.bq + jnp.arange(self.bq)
    ki = j * self.bk + jnp.arange(self.bk)
    m = _block_mask(self.qp[i], self.kp[j], self.qsg[i], self.ksg[j], qi, ki, self.window, self.causal_self)
    return m[:, None, None]

  def scores(self, qb, kb, i, j, masked: bool):
    """Scores [B, K, G, bq, bk] float32 (qb already scaled), masked unless the block is full, and the mask
    (None for a full block)."""
    s = jnp.einsum("bkmd,bknd->bkmn", qb, kb, preferred_element_type=jnp.float32)  # [B, K, M, bk]
    s = s.reshape(self.b, self.kvh, self.g, self.bq, self.bk)
    if not masked:
      return s, None
    mask = self.mask(i, j)
    return jnp.where(mask, s, _NEG), mask

  def visit(self, i, j, fn, *args):
    """fn(masked, *args) for block pair (i, j): the unmasked variant for full blocks; `skip(*args)`-style
    identity where nothing is visible is the caller's (pred)."""
    return jax.lax.cond(self.full[i, j], functools.partial(fn, False), functools.partial(fn, True), *args)


def _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k):
  """(out [B, T, H, Dh], lse [nq, B, K, M] float32, layout)."""
  lay = _Layout(q, k, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k)
  qb = (lay.q_blocks(q) * lay.dh ** -0.5).astype(q.dtype)  # [nq, B, K, M, Dh], scaled once
  kb, vb = lay.kv_blocks(k), lay.kv_blocks(v)
  lo, hi = _ranges(lay.pred)
  rows = (lay.b, lay.kvh, lay.g, lay.bq)

  def q_block(_, xs):
    i, qi = xs

    def update(masked, acc, m, l, j):  # acc [B, K, G, bq, Dh] f32, m / l [B, K, G, bq] f32
      s, mask = lay.scores(qi, kb[j], i, j, masked)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])  # [B, K, G, bq, bk]
      if masked:  # a row with nothing visible yet has m_new = _NEG and exp(0) = 1 where masked
        p = jnp.where(mask, p, 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkmn,bknd->bkmd", p.reshape(*rows[:2], -1, lay.bk).astype(v.dtype), vb[j],
                      preferred_element_type=jnp.float32).reshape(*rows, lay.dh)
      return acc * corr[..., None] + pv, m_new, l * corr + jnp.sum(p, axis=-1)

    def kv_step(j, carry):
      return jax.lax.cond(lay.pred[i, j], lambda c: lay.visit(i, j, update, *c, j), lambda c: c, carry)

    init = (jnp.zeros((*rows, lay.dh), jnp.float32), jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32))
    acc, m, l = jax.lax.fori_loop(lo[i], hi[i], kv_step, init)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (out.reshape(lay.b, lay.kvh, -1, lay.dh).astype(q.dtype), lse.reshape(lay.b, lay.kvh, -1))

  _, (ob, lse) = jax.lax.scan(q_block, None, (jnp.arange(lay.nq), qb))
  return lay.q_unblocks(ob), lse, lay


def _backward(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, dout, window, causal_self, block_q, block_k):
  lay = _Layout(q, k, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k)
  scale = lay.dh ** -0.5
  qb = (lay.q_blocks(q) * scale).astype(q.dtype)  # [nq, B, K, M, Dh], scaled as in the forward
  kb, vb, dob = lay.kv_blocks(k), lay.kv_blocks(v), lay.q_blocks(dout)
  delta = jnp.sum(lay.q_blocks(out).astype(jnp.float32) * dob.astype(jnp.float32), axis=-1)  # [nq, B, K, M]
  lo, hi = _ranges(lay.pred.T)  # per key block: the query blocks that see it
  m_rows = lay.g * lay.bq

  def kv_block(dq, xs):
    j, kj, vj = xs

    def update(masked, dk, dv, i):  # this pair's terms; dk / dv [B, K, bk, Dh] f32
      s, mask = lay.scores(qb[i], kj, i, j, masked)
      p = jnp.exp(s - lse[i].reshape(s.shape[:-1])[..., None])
      if masked:
        p = jnp.where(mask, p, 0.0)
      p = p.reshape(lay.b, lay.kvh, m_rows, lay.bk)  # [B, K, M, bk]
      dv = dv + jnp.einsum("bkmn,bkmd->bknd", p.astype(v.dtype), dob[i], preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkmd,bknd->bkmn", dob[i], vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None])).astype(q.dtype)  # [B, K, M, bk]
      dqi = jnp.einsum("bkmn,bknd->bkmd", ds, kj, preferred_element_type=jnp.float32) * scale  # [B, K, M, Dh]
      dk = dk + jnp.einsum("bkmn,bkmd->bknd", ds, qb[i], preferred_element_type=jnp.float32)
      return dqi, dk, dv

    def q_step(i, carry):
      # The conds carry only this pair's terms: the [nq, ...] dq accumulator stays outside them (a cond
      # over it would copy it on every step).
      dq, dk, dv = carry
      skip = lambda dk, dv: (jnp.zeros(dq.shape[1:], dq.dtype), dk, dv)  # noqa: E731
      dqi, dk, dv = jax.lax.cond(lay.pred[i, j], lambda dk, dv: lay.visit(i, j, update, dk, dv, i), skip, dk, dv)
      return dq.at[i].add(dqi), dk, dv

    zeros = jnp.zeros((lay.b, lay.kvh, lay.bk, lay.dh), jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(lo[j], hi[j], q_step, (dq, zeros, zeros))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros((lay.nq, lay.b, lay.kvh, m_rows, lay.dh), jnp.float32)
  dq, (dkb, dvb) = jax.lax.scan(kv_block, dq0, (jnp.arange(lay.nk), kb, vb))
  return lay.q_unblocks(dq).astype(q.dtype), lay.kv_unblocks(dkb), lay.kv_unblocks(dvb)


def _int_zeros(x):
  return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k):
  return _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k):
  out, lse, _ = _forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal_self, block_q, block_k)
  return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse)


def _flash_bwd(window, causal_self, block_q, block_k, res, dout):
  q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse = res
  dq, dk, dv = _backward(q, k, v, q_pos, k_pos, q_seg, k_seg, out, lse, dout, window, causal_self,
                         block_q, block_k)
  return dq, dk, dv, _int_zeros(q_pos), _int_zeros(k_pos), _int_zeros(q_seg), _int_zeros(k_seg)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window: Optional[int] = None,
                    causal_self: bool = False, block_q: int = 128, block_k: int = 128) -> jax.Array:
  """q [B, T, H, Dh], k/v [B, S, K, Dh], q_pos/q_seg [B, T], k_pos/k_seg [B, S] int -> [B, T, H, Dh].

  causal_self: keys are the queries' own tokens in order (adds index order to the mask, and lets whole
  upper blocks be skipped without looking at the data)."""
  if causal_self:
    assert k.shape[1] == q.shape[1], (k.shape, q.shape)
  as_int = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
  return _flash(q, k, v, as_int(q_pos), as_int(k_pos), as_int(q_seg), as_int(k_seg), window, causal_self,
                int(block_q), int(block_k))
