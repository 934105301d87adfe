"""nn.MultiheadAttention.forward re-expressed op for op (torch 2.x, the non-fast path), with
every projection a call of ``project(stream, x, weight, bias)``.

This is the training path of ``MultiheadAttention.forward`` + ``F.multi_head_attention_forward``
with the same operations in the same order, so outputs and gradients are bit-identical, and
scaled-dot-product attention (fused kernels included) still runs when ``need_weights=False``
(as nn.TransformerEncoderLayer/DecoderLayer call it). The only difference is that the in- and
output projections go through ``project``, which lets :mod:`natgrad.curvature.layers.attention` see
their inputs and attach hooks to their outputs. ``stream`` is "qkv" (one packed projection of
a self-attention input), "q", "kv" (encoder-decoder attention), "k", "v" or "out".
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Project = Callable[[str, Tensor, Tensor, Tensor | None], Tensor]


def _split3(t: Tensor, e: int) -> tuple[Tensor, ...]:
    t = t.unflatten(-1, (t.shape[-1] // e, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(t[i] for i in range(t.shape[0]))


def _in_projections(m: nn.MultiheadAttention, project: Project, query: Tensor, key: Tensor,
                    value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    e, b = m.embed_dim, m.in_proj_bias
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        return (project("q", query, m.q_proj_weight, b_q), project("k", key, m.k_proj_weight, b_k),
                project("v", value, m.v_proj_weight, b_v))
    w = m.in_proj_weight
    if key is value and query is key:
        q, k, v = _split3(project("qkv", query, w, b), e)
        return q, k, v
    if key is value:
        w_q, w_kv = w.split([e, e * 2])
        b_q, b_kv = (None, None) if b is None else b.split([e, e * 2])
        q = project("q", query, w_q, b_q)
        k, v = _split3(project("kv", key, w_kv, b_kv), e)
        return q, k, v
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
    return project("q", query, w_q, b_q), project("k", key, w_k, b_k), project("v", value, w_v, b_v)


def mha_forward(m: nn.MultiheadAttention, project: Project, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``m.forward(...)`` with the projections routed through ``project``."""
    is_batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    if m.batch_first and is_batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = _core(m, project, query, key, value, key_padding_mask, need_weights, attn_mask,
                         average_attn_weights, is_causal)
    if m.batch_first and is_batched:
        return out.transpose(1, 0), weights
    return out, weights


def _core(m, project, query, key, value, key_padding_mask, need_weights, attn_mask,
          average_attn_weights, is_causal):
    """F.multi_head_attention_forward (see the module docstring)."""
    num_heads = m.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                           "module method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    head_dim = embed_dim // num_heads
    q, k, v = _in_projections(m, project, query, key, value)
    src_len = k.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = m.dropout if m.training else 0.0
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = project("out", out, m.out_proj.weight, m.out_proj.bias).view(tgt_len, bsz, -1)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out, weights = out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = project("out", out, m.out_proj.weight, m.out_proj.bias).view(tgt_len, bsz, -1)
    if not is_batched:
        out = out.squeeze(1)
    return out, None
