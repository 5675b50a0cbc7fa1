"""Attention recording for diffusion transformers with joint text-image attention (SD3 / SD3.5).

A UNet has cross-attention layers whose keys can be swapped for the class prompt's; an MMDiT
block has one joint attention over [image tokens, prompt tokens] instead. dsdiff carries the
class prompt as an extra token stream through the blocks up to the last recorded one: at every
block it goes through that block's context-side projections, norms and feed-forward (the path
the generation prompt takes), its queries attend to the image tokens and to itself, and the
image tokens never attend to it. So the generated image is plain diffusers' bit for bit, and
the cross maps are the image queries against the class-prompt keys:

    cross = mean over heads of softmax(q_image k_class^T / sqrt(d))   (B, N, L)
    self  = mean over heads of softmax(q_image k_image^T / sqrt(d))   (B, N, N)

both summed into an :class:`~dsdiff.diffusion.attention.AttentionStore` over the recorded blocks
and the steps while ``store.recording`` is on, in query chunks of at most ``CHUNK_BYTES`` of
scores, so memory stays bounded at 4,096 image tokens (1024 px).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dsdiff.diffusion.attention import CHUNK_BYTES, AttentionStore, split_heads
from dsdiff.utils.errors import SettingError


# "attention": image queries against the class prompt's keys; "output": ConceptAttention's maps, the image
# tokens' attention outputs against the class tokens' (both before the output projection), same softmax
MAPS = ("attention", "output")


def _row_chunked_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) in fp32 averaged over heads, (B, H, N, d) x (B, H, L, d) -> (B, N, L),
    computed over query rows in chunks whose (B, H, n, L) scores stay under ``CHUNK_BYTES``."""
    b, h, n, _ = query.shape
    rows = max(1, min(n, CHUNK_BYTES // max(b * h * key.shape[2] * 4, 1)))
    k = key.float().transpose(-1, -2)
    return torch.cat([torch.softmax((q.float() * scale) @ k, dim=-1).mean(1) for q in query.split(rows, dim=2)], dim=1)


def _self_probs(query: torch.Tensor, key: torch.Tensor, scale: float, pool: tuple[int, int] | None) -> torch.Tensor:
    """Image-token self-attention (B, N, N), or with ``pool = (p, w)`` (``w`` the token grid's width) pooled to
    the grid p times coarser, (B, N / p^2, N / p^2): keys summed over p x p cells (rows stay stochastic),
    queries averaged over them, computed in bands of p token rows so the full N x N never exists."""
    if pool is None:
        return _row_chunked_probs(query, key, scale)
    p, w = pool
    b, h, n, _ = query.shape
    band = p * w
    rows = max(band, CHUNK_BYTES // max(b * h * n * 4, 1) // band * band)
    k = key.float().transpose(-1, -2)
    out = []
    for q in query.split(rows, dim=2):
        probs = torch.softmax((q.float() * scale) @ k, dim=-1).mean(1)  # (B, r, N)
        r = probs.shape[1]
        probs = probs.reshape(b, r, n // w // p, p, w // p, p).sum((3, 5)).flatten(2)  # keys: (B, r, M)
        out.append(probs.reshape(b, r // band, p, w // p, p, -1).mean((2, 4)).flatten(1, 2))  # queries: (B, r / p^2, M)
    return torch.cat(out, dim=1)


def check_blocks(blocks: Sequence[int], n_blocks: int, name: str = "blocks") -> list[int]:
    """Sorted unique block indices, refused (naming the setting) when empty or out of range."""
    try:
        chosen = sorted({int(b) for b in blocks})
    except (TypeError, ValueError) as err:
        raise SettingError(f"generator.labels.{name}={list(blocks)!r}: give block indices (integers)") from err
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_blocks:
        raise SettingError(
            f"generator.labels.{name}={chosen}: this transformer has blocks 0..{n_blocks - 1}; "
            "give a non-empty list of indices in that range"
        )
    return chosen


class _ClassStream:
    """The class prompt's tokens as they leave each block (B, L, D), rebuilt every recorded step."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.pending: dict | None = None  # the current block's normed class tokens and gates
        self.embedded: tuple[int, torch.dtype, torch.Tensor] | None = None  # (store.version, dtype, tokens)
        self.text_len = 0  # the prompt's tokens ahead of the image's in a single-stream (FLUX) block
        self.self_pool: tuple[int, int] | None = None  # (p, grid width): self maps pooled p times (self_res < grid)


class RecordingJointAttnProcessor:
    """JointAttnProcessor2_0's computation plus the class stream's attention and the maps.

    ``record`` says whether this block's maps go into the store (``cross`` and/or ``self``);
    blocks before the last recorded one still advance the class stream.
    """

    def __init__(self, store: AttentionStore, stream: _ClassStream, block, record: tuple[str, ...],
                 advance: bool, name: str = "", output_maps: bool = False) -> None:
        self.store, self.stream, self.block = store, stream, block
        self.record, self.advance, self.name = record, advance, name
        self.output_maps = output_maps and "cross" in record  # cross maps in the attention-output space

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                                  attn.to_v(hidden_states))

        if self.store.recording and (self.record or self.advance):
            self._class_side(attn, query, key, value, head_dim)

        if encoder_hidden_states is not None:
            ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if self.output_maps and self.store.recording and self.stream.pending is not None:
            b, n = self.store.batch_size, residual.shape[1]
            out_img = hidden_states[-b:, :n].reshape(b, n, attn.heads, head_dim).transpose(1, 2)
            self.store.add("cross", _row_chunked_probs(out_img, self.stream.pending["raw_out"], attn.scale))
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]], hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states

    @torch.compiler.disable
    def _class_side(self, attn, query, key, value, head_dim: int) -> None:
        b = self.store.batch_size
        if query.shape[0] not in (b, 2 * b):
            raise RuntimeError(f"block {self.name}: batch {query.shape[0]} is neither B={b} nor 2B (guidance)")
        q_img, k_img, v_img = query[-b:], key[-b:], value[-b:]  # with guidance the batch is [uncond, cond]
        if "self" in self.record:
            self.store.add("self", _self_probs(q_img, k_img, attn.scale, self.stream.self_pool))
        if self.stream.pending is None:  # no class prompt (or past the last cross block)
            return
        normed = self.stream.pending["normed"].to(query.dtype)
        heads = (b, -1, attn.heads, head_dim)
        k_cls = attn.add_k_proj(normed).view(*heads).transpose(1, 2)
        if attn.norm_added_k is not None:
            k_cls = attn.norm_added_k(k_cls)
        if "cross" in self.record and not self.output_maps:
            self.store.add("cross", _row_chunked_probs(q_img, k_cls, attn.scale))
        if self.advance or self.output_maps:  # class queries over [image, class] keys: the image never sees them
            q_cls = attn.add_q_proj(normed).view(*heads).transpose(1, 2)
            v_cls = attn.add_v_proj(normed).view(*heads).transpose(1, 2)
            if attn.norm_added_q is not None:
                q_cls = attn.norm_added_q(q_cls)
            out = F.scaled_dot_product_attention(q_cls, torch.cat([k_img, k_cls], 2), torch.cat([v_img, v_cls], 2))
            self.stream.pending["raw_out"] = out  # (B, H, L, d), before the output projection
            if self.advance:
                self.stream.pending["attn_out"] = attn.to_add_out(out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim))


class JointRecorder:
    """Installs class-stream recording on an ``SD3Transformer2DModel``'s joint blocks.

    ``blocks`` record cross maps (class prompt) and, when ``self_blocks`` is None, self maps too;
    ``store.class_embeds`` holds the class prompt's ``prompt_embeds`` from the pipeline's own
    ``encode_prompt`` (CLIP and T5 tokens, (B, L, joint_attention_dim)).
    """

    def __init__(self, transformer, store: AttentionStore, blocks: Sequence[int],
                 self_blocks: Sequence[int] | None = None, maps: str = "attention") -> None:
        if maps not in MAPS:
            raise SettingError(f"generator.labels.maps={maps!r}: use one of {list(MAPS)}")
        self.maps = maps
        self.transformer, self.store = transformer, store
        self.all_blocks = self.block_list(transformer)
        n = len(self.all_blocks)
        self.blocks = check_blocks(blocks, n)
        self.self_blocks = self.blocks if self_blocks is None else check_blocks(self_blocks, n, "self_blocks")
        self.stream = _ClassStream()
        self._saved: dict | None = None
        self._hooks: list = []

    def install(self) -> "JointRecorder":
        if self._saved is not None:
            return self
        self._saved = dict(self.transformer.attn_processors)
        last = max(self.blocks[-1], self.self_blocks[-1])
        for i in range(last + 1):
            block = self.all_blocks[i]
            record = tuple(k for k, chosen in (("cross", self.blocks), ("self", self.self_blocks)) if i in chosen)
            advance = i < self.blocks[-1]  # the class stream is needed only up to the last cross block
            block.attn.set_processor(self.processor(i, block, record, advance))
            self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i, block), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._post_hook(block)))
        return self

    @staticmethod
    def block_list(transformer) -> list:
        """The blocks ``generator.labels.blocks`` indexes, in the order they run."""
        return list(transformer.transformer_blocks)

    def processor(self, index: int, block, record: tuple[str, ...], advance: bool):
        return RecordingJointAttnProcessor(self.store, self.stream, block, record, advance, f"transformer_blocks.{index}",
                                           output_maps=self.maps == "output")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._saved is not None:
            self.transformer.set_attn_processor(self._saved)
            self._saved = None
        self.stream.pending = self.stream.tokens = None

    def __enter__(self) -> "JointRecorder":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_tokens(self) -> int:
        """Class-prompt tokens carried per sample (the stream's cost is this many extra context tokens
        through the blocks up to the last recorded one, without entering the image's attention)."""
        embeds = self.store.class_embeds
        return 0 if embeds is None else int(embeds.shape[1])

    def _embedded(self, dtype: torch.dtype, device) -> torch.Tensor:
        cached = self.stream.embedded
        if cached is not None and cached[0] == self.store.version and cached[1] == dtype:
            return cached[2]
        embeds = self.store.class_embeds.to(device=device, dtype=dtype)
        tokens = self.transformer.context_embedder(embeds)
        self.stream.embedded = (self.store.version, dtype, tokens)
        return tokens

    def _pre_hook(self, index: int, block):
        def hook(module, args, kwargs):
            self.stream.pending = None
            if not self.store.recording or self.store.class_embeds is None or index > self.blocks[-1]:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
            b = self.store.batch_size
            if index == 0:
                self.stream.tokens = self._embedded(hidden.dtype, hidden.device)
            tokens, temb = self.stream.tokens, temb[-b:]
            if block.context_pre_only:
                self.stream.pending = {"normed": block.norm1_context(tokens, temb)}
            else:
                self.stream.pending = self.context_pending(block, tokens, temb)
            return None
        return hook

    @staticmethod
    def context_pending(block, tokens: torch.Tensor, temb: torch.Tensor) -> dict:
        """The class tokens through a block's context norm: normed tokens and the gates the post-hook uses."""
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(tokens, emb=temb)
        return {"normed": normed, "gates": (gate_msa, shift_mlp, scale_mlp, gate_mlp)}

    def _post_hook(self, block):
        def hook(module, args, output):
            pending, self.stream.pending = self.stream.pending, None
            if pending is None or "attn_out" not in pending or getattr(block, "context_pre_only", False):
                return None
            gate_msa, shift_mlp, scale_mlp, gate_mlp = pending["gates"]
            tokens = self.stream.tokens + gate_msa.unsqueeze(1) * pending["attn_out"]
            normed = block.norm2_context(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            self.stream.tokens = tokens + gate_mlp.unsqueeze(1) * block.ff_context(normed)
            return None
        return hook
