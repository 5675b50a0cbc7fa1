"""Attention recording for FLUX.1 (``FluxTransformer2DModel``): dual- and single-stream blocks.

The same class-prompt stream as for SD3 (:mod:`dsdiff.diffusion.mmdit`), through FLUX's two kinds
of blocks. ``generator.labels.blocks`` indexes the dual-stream blocks first (0..18 in FLUX.1), then
the single-stream ones (19..56). In a dual-stream block the class tokens take the context path
(``add_q/k/v_proj``, ``to_add_out``, the context feed-forward); in a single-stream block, where text
and image share one sequence and one set of projections, they take that block's path (its norm,
``to_q/k/v``, the parallel MLP and ``proj_out``). Image queries and keys are taken after FLUX's
rotary embedding; the class tokens get the text tokens' position (ids 0, a rotation by zero, so
none). FLUX.1 has no classifier-free guidance batch: every sample of the batch is conditional.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from dsdiff.diffusion.mmdit import JointRecorder, _row_chunked_probs, _self_probs


class RecordingFluxAttnProcessor:
    """FluxAttnProcessor's computation plus the class stream's attention and the maps."""

    _attention_backend = None  # as diffusers' FluxAttnProcessor: set_attention_backend() sets these
    _parallel_config = None

    def __init__(self, recorder: "FluxRecorder", block, record: tuple[str, ...], advance: bool, single: bool,
                 name: str = "") -> None:
        self.recorder, self.store, self.stream = recorder, recorder.store, recorder.stream
        self.block, self.record, self.advance, self.single, self.name = block, record, advance, single, name
        self.output_maps = recorder.maps == "output" and "cross" in record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.stream.text_len
        if self.store.recording and (self.record or self.advance):
            self._class_side(attn, query[:, text:], key[:, text:], value[:, text:])

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        if self.output_maps and self.store.recording and self.stream.pending is not None:
            out_img = hidden_states[-self.store.batch_size:, text:].transpose(1, 2)  # (B, H, N, d)
            self.store.add("cross", _row_chunked_probs(out_img, self.stream.pending["raw_out"], attn.head_dim**-0.5))
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states

    @torch.compiler.disable
    def _class_side(self, attn, q_img, k_img, v_img) -> None:
        """``q_img`` etc. are (B', N, H, d), rotary applied; the maps and the class stream's attention."""
        b = self.store.batch_size
        if q_img.shape[0] not in (b, 2 * b):
            raise RuntimeError(f"block {self.name}: batch {q_img.shape[0]} is neither B={b} nor 2B")
        q_img, k_img, v_img = (t[-b:].transpose(1, 2) for t in (q_img, k_img, v_img))  # (B, H, N, d)
        if "self" in self.record:
            self.store.add("self", _self_probs(q_img, k_img, attn.head_dim**-0.5, self.stream.self_pool))
        if self.stream.pending is None:
            return
        normed = self.stream.pending["normed"].to(q_img.dtype)
        if self.single:  # one set of projections for every token
            proj_q, proj_k, proj_v, norm_q, norm_k = attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k
        else:
            proj_q, proj_k, proj_v = attn.add_q_proj, attn.add_k_proj, attn.add_v_proj
            norm_q, norm_k = attn.norm_added_q, attn.norm_added_k
        k_cls = norm_k(proj_k(normed).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
        if "cross" in self.record and not self.output_maps:
            self.store.add("cross", _row_chunked_probs(q_img, k_cls, attn.head_dim**-0.5))
        if self.advance or self.output_maps:
            q_cls = norm_q(proj_q(normed).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
            v_cls = proj_v(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
            out = torch.nn.functional.scaled_dot_product_attention(
                q_cls, torch.cat([k_img, k_cls], 2), torch.cat([v_img, v_cls], 2))
            self.stream.pending["raw_out"] = out  # (B, H, L, d), before any output projection
            out = out.transpose(1, 2).flatten(2, 3)
            self.stream.pending["attn_out"] = out if self.single else attn.to_add_out(out)


class FluxRecorder(JointRecorder):
    """Class-stream recording on a ``FluxTransformer2DModel``: blocks are the dual-stream ones, then
    the single-stream ones; ``store.class_embeds`` is the class prompt's T5 ``prompt_embeds``."""

    @staticmethod
    def block_list(transformer) -> list:
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def processor(self, index: int, block, record: tuple[str, ...], advance: bool):
        n_dual = len(self.transformer.transformer_blocks)
        single = index >= n_dual
        name = f"single_transformer_blocks.{index - n_dual}" if single else f"transformer_blocks.{index}"
        return RecordingFluxAttnProcessor(self, block, record, advance, single, name)

    def _pre_hook(self, index: int, block):
        single = index >= len(self.transformer.transformer_blocks)

        def hook(module, args, kwargs):
            self.stream.pending = None
            if not self.store.recording:
                return None
            self.stream.text_len = kwargs["encoder_hidden_states"].shape[1]
            if self.store.class_embeds is None or index > self.blocks[-1]:
                return None
            hidden, temb = kwargs["hidden_states"], kwargs["temb"][-self.store.batch_size:]
            if index == 0:
                self.stream.tokens = self._embedded(hidden.dtype, hidden.device)
            tokens = self.stream.tokens
            if single:
                normed, gate = block.norm(tokens, emb=temb)
                self.stream.pending = {"normed": normed, "gate": gate,
                                       "mlp": block.act_mlp(block.proj_mlp(normed))}
            else:
                self.stream.pending = self.context_pending(block, tokens, temb)
            return None
        return hook

    def _post_hook(self, block):
        single = not hasattr(block, "norm1_context")
        dual_hook = super()._post_hook(block)

        def hook(module, args, output):
            if not single:
                return dual_hook(module, args, output)
            pending, self.stream.pending = self.stream.pending, None
            if pending is None or "attn_out" not in pending:
                return None
            update = block.proj_out(torch.cat([pending["attn_out"], pending["mlp"]], dim=2))
            self.stream.tokens = self.stream.tokens + pending["gate"].unsqueeze(1) * update
            return None
        return hook
