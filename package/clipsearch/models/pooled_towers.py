"""Forward passes of open_clip's transformer towers that compute only what their pooled embedding reads.

A CLIP tower hands one token on: the text tower its end-of-text token (under a causal mask, so no
token after it matters), the ViT its class token. Two savings follow, both giving the features of
the full computation up to float rounding:

- a batch of captions runs only as far as its longest caption (the end-of-text position plus
  one), not the whole context: padding after the end-of-text token is never attended to;
- the last block computes keys and values for every token but queries, attention output and MLP
  only for the pooled token, the one row the tower returns.

On the sample data (captions of at most 24 of ViT-Small-16's 32 tokens) both together cut a
training step's model time by about a fifth; with OpenAI's 77-token context the text tower's
share shrinks far more (BENCHMARKS.md, "Training: where the time goes").
Every other layout (custom blocks, attention pooling, non-causal text, gradient checkpointing,
sequence-first blocks) runs open_clip's own forward.
"""
from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
from torch import nn


def _plain_blocks(transformer: nn.Module) -> bool:
    """open_clip's standard pre-norm blocks, batch first, run one after another."""
    return (
        type(transformer) is Transformer
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and len(transformer.resblocks) > 0
        and all(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
                for block in transformer.resblocks)
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


def _last_block_at(block: ResidualAttentionBlock, x: torch.Tensor, rows: torch.Tensor,
                   hidden_keys: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x)` at one position per sequence, `rows` [B]: those queries attend to every key of
    their sequence but the `hidden_keys` [B, L] (True: masked), as in the full block; [B, D]."""
    batch = torch.arange(x.shape[0], device=x.device)
    normed = block.ln_1(x)
    queries = normed[batch, rows].unsqueeze(1)
    # Queries apart from keys: nn.MultiheadAttention then projects only these rows to queries.
    attended = block.attn(queries, normed, normed, need_weights=False, key_padding_mask=hidden_keys)[0]
    y = x[batch, rows].unsqueeze(1) + block.ls_1(attended)
    y = y + block.ls_2(block.mlp(block.ln_2(y)))
    return y.squeeze(1)


def encode_pooled_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip `CLIP.encode_text(tokens)`, computed only up to the longest caption and, in the last
    block, only at each caption's end-of-text token (`text_fits(model)` must hold)."""
    positions = _pooled_positions(model, tokens)
    length = int(positions.max()) + 1  # one sync with the device per batch
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length]
    *blocks, last = model.transformer.resblocks
    for block in blocks:
        x = block(x, attn_mask=mask)
    later = torch.arange(length, device=x.device)[None, :] > positions[:, None]
    x = model.ln_final(_last_block_at(last, x, positions, hidden_keys=later))
    if isinstance(model.text_projection, nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection


def encode_pooled_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip `VisionTransformer(images)` with the last block computed only at the class token
    (`image_fits(visual)` must hold)."""
    x = visual._embeds(images)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    class_token = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    pooled = visual.ln_post(_last_block_at(last, x, class_token))  # per-token norm: before or after pooling alike
    return pooled if visual.proj is None else pooled @ visual.proj
