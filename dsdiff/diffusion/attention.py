"""Attention recording (docs/method.md): diffusers processors and running sums.

Only the layers whose maps are used get a recording processor (cross-attention at
one resolution, self-attention at another); every other layer keeps SDPA. The
store keeps running sums, so memory does not grow with the number of steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from dsdiff.utils.errors import SettingError


def attention_layer_sizes(unet, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Spatial (h, w) grid of every attention processor of a UNet2DConditionModel for a latent size."""
    sizes = [tuple(latent_hw)]
    for block in unet.down_blocks:
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)) if block.downsamplers is not None else (h, w))
    # sizes[i] is down block i's grid; the mid block runs at the last, up block j mirrors down block n-1-j.
    n = len(unet.down_blocks)
    out = {}
    for name in unet.attn_processors:
        part, rest = name.split(".", 1)
        if part == "down_blocks":
            out[name] = sizes[int(rest.split(".", 1)[0])]
        elif part == "mid_block":
            out[name] = sizes[n]
        elif part == "up_blocks":
            out[name] = sizes[n - 1 - int(rest.split(".", 1)[0])]
        else:
            raise ValueError(f"unexpected attention layer {name!r}: dsdiff needs a UNet2DConditionModel layout")
    return out


class AttentionStore:
    """Running sums of the conditional branch's attention for one batch of B prompts.

    ``cross_sum`` is (B, Nc, L): class-prompt attention summed over heads-means, layers and
    steps; ``self_sum`` is (B, Ns, Ns). Means are sums divided by the counts.
    """

    def __init__(self) -> None:
        self.batch_size = 0
        self.class_embeds: torch.Tensor | None = None
        self.recording = False
        self.cross_sum: torch.Tensor | None = None
        self.self_sum: torch.Tensor | None = None
        self.cross_count = 0
        self.self_count = 0
        self.version = 0  # bumped by reset(): recorders cache the class prompt's keys per version

    def reset(self, class_embeds: torch.Tensor | None, batch_size: int | None = None) -> None:
        """Start a batch: class-prompt embeddings (B, L, D) from the text encoder, or None to
        record the generation prompt's own cross-attention (then pass ``batch_size``)."""
        self.batch_size = class_embeds.shape[0] if class_embeds is not None else int(batch_size)
        self.class_embeds = class_embeds
        self.cross_sum = self.self_sum = None
        self.cross_count = self.self_count = 0
        self.recording = True
        self.version += 1

    def clear(self) -> None:
        """Drop the sums and embeddings (between batches)."""
        version = getattr(self, "version", 0)
        self.__init__()
        self.version = version + 1

    def add(self, kind: str, probs: torch.Tensor) -> None:
        attr = f"{kind}_sum"
        total = getattr(self, attr)
        setattr(self, attr, probs if total is None else total.add_(probs))
        setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + 1)

    def mean(self, kind: str) -> torch.Tensor:
        """(B, Nc, L) for ``"cross"``, (B, Ns, Ns) for ``"self"``."""
        total, count = getattr(self, f"{kind}_sum"), getattr(self, f"{kind}_count")
        if total is None:
            raise RuntimeError(f"no {kind}-attention was recorded: check the timestep window and resolutions")
        return total / count

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cross_sum, self.self_sum) if t is not None)


# Transient fp32 scores of one chunk of samples are kept under this many bytes: at SD's 32x32
# self-attention (10 heads, N = 1024) that is one sample at a time, at 16x16 cross-attention
# over 77 class-prompt tokens a whole batch of 8 in one product (fewer kernel launches).
CHUNK_BYTES = 64 * 2**20
# True: for fp16 Q and K, Q K^T in fp16 on the tensor cores (fp32 accumulation), softmax in fp32.
# Off: on an H200 (SD 2.1 layout, batch 8) it was slower than fp32 scores (1.40x vs 1.16x of plain
# diffusers) and changed 0.9% of label pixels (experiments/results/bench_generation.md).
FP16_SCORES = False


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    if FP16_SCORES and q.dtype == torch.float16:
        return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1, dtype=torch.float32).mean(1)
    # scaling Q (N x d) rather than the scores (N x L) is one small kernel instead of a large one
    return torch.softmax((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1).mean(1)


def _head_mean_probs(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale) in fp32, averaged over heads: (B, H, N, d) x (B, H, L, d) -> (B, N, L).

    Samples go in chunks whose (b, H, N, L) scores fit ``CHUNK_BYTES``, so the transient stays small.
    """
    b, h, n, _ = query.shape
    per_sample = h * n * key.shape[2] * 4
    step = max(1, min(b, CHUNK_BYTES // max(per_sample, 1)))
    return torch.cat([_probs(q, k, scale) for q, k in zip(query.split(step), key.split(step))])


def split_heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(B, N, H*d) projections -> (B, H, N, d) each, the layer's q/k norms applied, as diffusers' processors
    do; returns them and the head width d."""
    batch_size, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class RecordingAttnProcessor:
    """AttnProcessor2_0's computation plus recording of the conditional branch's attention.

    ``kind="self"`` records softmax(QK^T) of the layer itself; ``kind="cross"`` records the
    attention of the layer's queries over the class prompt's keys (``store.class_embeds``),
    which never enters the output: the image is the plain pipeline's.
    """

    def __init__(self, store: AttentionStore, kind: str, hw: tuple[int, int], name: str = "") -> None:
        if kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', got {kind!r}")
        self.store, self.kind, self.hw, self.name = store, kind, tuple(hw), name
        self._class_keys: tuple[int, torch.Tensor] | None = None  # (store.version, keys): same every step

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value, head_dim = split_heads(attn, query, attn.to_k(encoder_hidden_states),
                                                  attn.to_v(encoder_hidden_states))

        if self.store.recording:
            self._record(attn, query, key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @torch.compiler.disable  # python-side sums and counts: run eagerly inside a compiled UNet
    def _record(self, attn, query: torch.Tensor, key: torch.Tensor) -> None:
        b, n = self.store.batch_size, query.shape[2]
        if n != self.hw[0] * self.hw[1]:
            raise RuntimeError(
                f"layer {self.name} was installed for a {self.hw[0]}x{self.hw[1]} grid but sees {n} positions: "
                "reinstall the processors for this latent size"
            )
        if query.shape[0] not in (b, 2 * b):
            raise RuntimeError(f"layer {self.name}: batch {query.shape[0]} is neither B={b} nor 2B (guidance)")
        q_cond = query[-b:]  # with guidance the batch is [uncond, cond]
        if self.kind == "self":
            self.store.add("self", _head_mean_probs(q_cond, key[-b:], attn.scale))
            return
        if self.store.class_embeds is None:  # the prompt's own tokens (ablation of the class prompt)
            self.store.add("cross", _head_mean_probs(q_cond, key[-b:], attn.scale))
            return
        self.store.add("cross", _head_mean_probs(q_cond, self._class_key(attn, query), attn.scale))

    def _class_key(self, attn, query: torch.Tensor) -> torch.Tensor:
        """The class prompt's keys (B, H, L, d): computed on a batch's first step, reused on the others."""
        cached = self._class_keys
        if cached is not None and cached[0] == self.store.version and cached[1].dtype == query.dtype:
            return cached[1]
        embeds = self.store.class_embeds.to(device=query.device, dtype=query.dtype)
        if attn.norm_cross:
            embeds = attn.norm_encoder_hidden_states(embeds)
        k_cls = attn.to_k(embeds).view(self.store.batch_size, -1, attn.heads, query.shape[-1]).transpose(1, 2)
        if attn.norm_k is not None:
            k_cls = attn.norm_k(k_cls)
        self._class_keys = (self.store.version, k_cls)
        return k_cls


def recording_processors(
    unet, store: AttentionStore, latent_hw: tuple[int, int], cross_res: int, self_res: int
) -> dict[str, object]:
    """A full processor dict: recorders on cross-attention (attn2) at ``cross_res`` and self-attention
    (attn1) at ``self_res`` (resolution = grid height), SDPA everywhere else."""
    sizes = attention_layer_sizes(unet, latent_hw)
    procs: dict[str, object] = {}
    found = {"cross": 0, "self": 0}
    for name, hw in sizes.items():
        kind = "self" if name.endswith("attn1.processor") else "cross" if name.endswith("attn2.processor") else None
        wanted = {"self": self_res, "cross": cross_res}.get(kind)
        if kind is not None and hw[0] == wanted:
            procs[name] = RecordingAttnProcessor(store, kind, hw, name)
            found[kind] += 1
        else:
            procs[name] = AttnProcessor2_0()
    for kind, res in (("cross", cross_res), ("self", self_res)):
        if not found[kind]:
            available = sorted({hw[0] for hw in sizes.values()}, reverse=True)
            raise SettingError(
                f"no {kind}-attention layer at resolution {res} for a {latent_hw[0]}x{latent_hw[1]} latent; "
                f"this UNet has attention at {available}: set {kind}_res to one of them"
            )
    return procs
