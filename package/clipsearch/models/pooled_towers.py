"""Forward passes of open_clip's transformer towers that compute only what their pooled embedding reads.

A CLIP tower hands one token on: the text tower its end-of-text token (under a causal mask, so no
token after it matters), the ViT its class token. The savings below all give the features of the
full computation up to float rounding:

- a caption runs only as far as its own end-of-text token: the blocks' per-token work (norms,
  projections, MLP) runs on the captions' real tokens packed into one [tokens, width] matrix, and
  only attention sees them padded to the batch's longest caption, where the causal mask keeps the
  padding out of every real token's view;
- the last block computes keys and values for every token but queries, attention output and MLP
  only for the pooled token, the one row the tower returns;
- attention is one projection and `scaled_dot_product_attention` on batch-first tensors, without
  nn.MultiheadAttention's transposes to sequence-first and back;
- OpenAI's QuickGELU, x * sigmoid(1.702 x), runs as SiLU with its 1.702 folded into the MLP's two
  weight matrices (a pass over a weight instead of two over an activation, forward and backward).

On the sample data (captions of 11 to 24 of ViT-Small-16's 32 tokens, 17 on average) the packing,
the attention and the folded QuickGELU took a training step in one process from 769 to 612 ms
(profile_train.py --part step); with OpenAI's 77-token context the text tower's
share shrinks far more (BENCHMARKS.md, "Training: where the time goes").
Every other layout (custom blocks, attention pooling, non-causal text, gradient checkpointing,
sequence-first blocks, attention dropout) runs open_clip's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch import nn


def _plain_blocks(transformer: nn.Module) -> bool:
    """open_clip's standard pre-norm blocks, batch first, run one after another."""
    return (
        type(transformer) is Transformer
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and len(transformer.resblocks) > 0
        and all(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv") and _plain_attention(block.attn)
                for block in transformer.resblocks)
    )


def _plain_attention(attention: nn.Module) -> bool:
    """nn.MultiheadAttention as open_clip builds it: one packed in-projection, no extra keys, no dropout."""
    return (
        isinstance(attention, nn.MultiheadAttention)
        and attention.batch_first
        and attention._qkv_same_embed_dim
        and attention.bias_k is None
        and not attention.add_zero_attn
        and attention.dropout == 0.0
    )


def text_fits(model: nn.Module) -> bool:
    """Whether `encode_pooled_text` computes this CLIP's text features."""
    return (
        getattr(model, "attn_mask", None) is not None  # causal: later tokens cannot reach the pooled one
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and _plain_blocks(model.transformer)
    )


def image_fits(visual: nn.Module) -> bool:
    """Whether `encode_pooled_image` computes this tower's image features."""
    return (
        type(visual) is VisionTransformer
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.output_tokens
        and hasattr(visual, "_embeds")
        and _plain_blocks(visual.transformer)
    )


def _pooled_positions(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Each caption's end-of-text position, where open_clip's text pooling reads."""
    if model.text_pool_type == "argmax":  # OpenAI's end-of-text token has the highest id
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)`; a QuickGELU computed as SiLU(scale x) / scale has its scale folded into the weights:
    c_proj(SiLU(scale c_fc(x)) / scale), with both scalings applied to weights, not to activations."""
    scale = getattr(mlp.gelu, "silu_scale", None)
    if scale is None:
        return mlp(x)
    hidden = F.silu(F.linear(x, mlp.c_fc.weight * scale, None if mlp.c_fc.bias is None else mlp.c_fc.bias * scale))
    return F.linear(hidden, mlp.c_proj.weight / scale, mlp.c_proj.bias)


def _heads(projected: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, parts x D] -> `parts` tensors [B, heads, L, D / heads]."""
    batch, length, width = projected.shape
    return projected.view(batch, length, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` of a ViT, every token seeing every other, on [B, L, D]."""
    attention = block.attn
    query, key, value = _heads(F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias), 3,
                               attention.num_heads)
    attended = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)
    x = x + block.ls_1(F.linear(attended, attention.out_proj.weight, attention.out_proj.bias))
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def _packed_causal_block(block: ResidualAttentionBlock, x: torch.Tensor, rows: torch.Tensor,
                         batch: int, length: int) -> torch.Tensor:
    """`block(x, causal mask)` of a text tower on captions packed as [tokens, D]: row i of `x` is row
    `rows[i]` of the padded [batch x length] layout, which only attention uses."""
    attention = block.attn
    projected = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias)
    padded = projected.new_zeros(batch * length, projected.shape[1]).index_copy(0, rows, projected)
    query, key, value = _heads(padded.view(batch, length, -1), 3, attention.num_heads)
    attended = F.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2).reshape(batch * length, -1)
    x = x + block.ls_1(F.linear(attended.index_select(0, rows), attention.out_proj.weight, attention.out_proj.bias))
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def _last_block_at(block: ResidualAttentionBlock, x: torch.Tensor, rows: torch.Tensor,
                   hidden_keys: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x)` at one position per sequence, `rows` [B]: those queries attend to every key of
    their sequence but the `hidden_keys` [B, L] (True: masked), as in the full block; [B, D]."""
    attention = block.attn
    batch = torch.arange(x.shape[0], device=x.device)
    normed = block.ln_1(x)
    width = normed.shape[-1]
    query_weight, key_value_weight = attention.in_proj_weight.split([width, 2 * width])
    query_bias, key_value_bias = (None, None) if attention.in_proj_bias is None else attention.in_proj_bias.split([width, 2 * width])
    (query,) = _heads(F.linear(normed[batch, rows].unsqueeze(1), query_weight, query_bias), 1, attention.num_heads)
    key, value = _heads(F.linear(normed, key_value_weight, key_value_bias), 2, attention.num_heads)
    visible = None if hidden_keys is None else ~hidden_keys[:, None, None, :]
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=visible).transpose(1, 2).flatten(2)
    y = x[batch, rows].unsqueeze(1) + block.ls_1(F.linear(attended, attention.out_proj.weight, attention.out_proj.bias))
    y = y + block.ls_2(_mlp(block.mlp, block.ln_2(y)))
    return y.squeeze(1)


def encode_pooled_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip `CLIP.encode_text(tokens)`, each caption computed only up to its end-of-text token and,
    in the last block, only at that token (`text_fits(model)` must hold)."""
    positions = _pooled_positions(model, tokens)
    length = int(positions.max()) + 1  # one sync with the device per batch
    batch = tokens.shape[0]
    cast_dtype = model.transformer.get_cast_dtype()
    later = torch.arange(length, device=tokens.device)[None, :] > positions[:, None]
    rows = (~later).flatten().nonzero().squeeze(1)  # the real tokens' rows in the padded [batch x length] layout
    x = model.token_embedding(tokens[:, :length].flatten().index_select(0, rows)).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype).index_select(0, rows % length)
    *blocks, last = model.transformer.resblocks
    for block in blocks:
        x = _packed_causal_block(block, x, rows, batch, length)
    padded = x.new_zeros(batch * length, x.shape[1]).index_copy(0, rows, x).view(batch, length, -1)
    x = model.ln_final(_last_block_at(last, padded, positions, hidden_keys=later))
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection


def encode_pooled_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip `VisionTransformer(images)` with the last block computed only at the class token
    (`image_fits(visual)` must hold)."""
    x = visual._embeds(images)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = _block(block, x)
    class_token = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    pooled = visual.ln_post(_last_block_at(last, x, class_token))  # per-token norm: before or after pooling alike
    return pooled if visual.proj is None else pooled @ visual.proj
