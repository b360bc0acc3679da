"""Our own Llama-3 model: RMSNorm, RoPE (default and llama3 scaling), GQA attention, SwiGLU.

Module names equal the checkpoint's tensor names (`model.layers.6.self_attn.q_proj.weight`), and
blocks are keyed by their absolute index, so a process that holds only blocks 6-16 loads exactly
those tensors with no rename map. A `Llama` holds any subset of the model: the master holds the
embedding and the head, a worker holds a few blocks. No networking here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cake.config import LlamaConfig
from cake.devices import weight_layout_in_out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as the reference does, so that
        # bf16/f16 results match it bit for bit where possible.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.1's frequency-dependent scaling if set."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the middle band blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryTables:
    """cos/sin for every position up to `max_seq_len`, computed once: (max_seq_len, head_dim)."""

    def __init__(
        self, config: LlamaConfig, max_seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        inv_freq = rope_inv_freq(config)
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def at(self, start_pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.cos[start_pos : start_pos + length],
            self.sin[start_pos : start_pos + length],
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, hd) broadcast over batch and heads.
    return x * cos + _rotate_half(x) * sin


class Projection(nn.Module):
    """y = x @ W.T for one weight, or for several fused along the output (q|k|v, gate|up).

    Stored in the layout the device multiplies fastest, as `cake.devices.weight_layout_in_out`
    decides: (in, out) for float32 on the CPU when out >= in, the checkpoint's (out, in)
    otherwise.
    """

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        weight = torch.cat(list(weights), dim=0) if len(weights) > 1 else weights[0]  # (out, in)
        self.transposed = weight_layout_in_out(weight.device, weight.dtype, *weight.shape)
        stored = weight.t().contiguous() if self.transposed else weight.contiguous()
        self.weight = nn.Parameter(stored, requires_grad=False)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W (out, in) for `ids`: a tied head doubles as the embedding table."""
        return self.weight.t()[ids] if self.transposed else self.weight[ids]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight if self.transposed else F.linear(x, self.weight)


class KVCache:
    """A static cache for one block of one session: preallocated once, written at positions."""

    def __init__(
        self,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (1, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(
        self, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (1, n_kv, T, hd) at start_pos; return every key/value up to the last one."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


SessionCache = dict[int, KVCache]  # block index -> its KV cache


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, hidden, bias=False)
        self.qkv: Projection | None = None
        self.out: Projection | None = None

    def pack(self) -> None:
        """Replace the checkpoint's four projections by one fused q|k|v and the output."""
        self.qkv = Projection([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        self.out = Projection([self.o_proj.weight])
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        assert self.qkv is not None and self.out is not None, "call Llama.pack() first"
        batch, length, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        # q is a strided view of the fused output; lay it out densely for SDPA (cheap: T*nh*hd).
        q = q.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2).contiguous()
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, nh, T, hd); k, v: (B, n_kv, T, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        keys, values = cache.update(start_pos, k, v)  # (B, n_kv, start_pos + T, hd)
        y = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=_causal_mask(start_pos, length, x.device),
            # From position 0 the mask is plain causal: the kernel then skips the masked half.
            is_causal=start_pos == 0 and length > 1,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(batch, length, q_size)
        return self.out(y)


def _causal_mask(start_pos: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Query t (at position start_pos + t) sees keys 0..start_pos + t; None when it sees all
    (one query) or when SDPA's own causal mask fits (from position 0)."""
    if length == 1 or start_pos == 0:
        return None
    query_pos = torch.arange(start_pos, start_pos + length, device=device)[:, None]
    key_pos = torch.arange(start_pos + length, device=device)[None, :]
    return key_pos <= query_pos  # (T, start_pos + T) bool


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.inner = inner
        self.gate_up: Projection | None = None
        self.down: Projection | None = None

    def pack(self) -> None:
        """Replace the checkpoint's projections by one fused gate|up and the down projection."""
        self.gate_up = Projection([self.gate_proj.weight, self.up_proj.weight])
        self.down = Projection([self.down_proj.weight])
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up is not None and self.down is not None, "call Llama.pack() first"
        gate, up = self.gate_up(x).split([self.inner, self.inner], dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), start_pos, cache, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The checkpoint's `model.` prefix: embedding, the blocks this process holds, final norm."""

    def __init__(
        self, config: LlamaConfig, blocks: Iterable[int], with_embedding: bool, with_norm: bool
    ) -> None:
        super().__init__()
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if with_embedding else None
        )
        # ModuleDict keyed by the absolute block index gives the names `model.layers.{i}.*`.
        self.layers = nn.ModuleDict({str(i): Block(config) for i in sorted(blocks)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if with_norm else None


class Llama(nn.Module):
    """Any part of a Llama model: some blocks, and optionally the embedding and/or the head."""

    def __init__(
        self,
        config: LlamaConfig,
        blocks: Iterable[int] = (),
        with_embedding: bool = False,
        with_head: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, blocks, with_embedding, with_norm=with_head)
        self.lm_head = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if with_head else None
        )
        self.rope: RotaryTables | None = None
        self.head_proj: Projection | None = None

    def pack(self) -> None:
        """After loading: fuse projections and lay weights out for fast multiplication.

        The checkpoint's names are what `load_state_dict` fills; this turns them into the
        runtime layout (see Projection). It packs whatever is loaded and not packed yet, so the
        loader can call it after each block. A tied head keeps a single copy, which also serves
        as the embedding table.
        """
        for block in self.model.layers.values():
            if block.mlp.gate_up is None and not block.mlp.gate_proj.weight.is_meta:
                block.self_attn.pack()
                block.mlp.pack()
        if self.lm_head is not None and not self.lm_head.weight.is_meta:
            embedding = self.model.embed_tokens
            tied = embedding is not None and embedding.weight.data_ptr() == (
                self.lm_head.weight.data_ptr()
            )
            self.head_proj = Projection([self.lm_head.weight])
            self.lm_head = None
            if tied:
                self.model.embed_tokens = None

    @property
    def blocks(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def setup_rope(self, max_seq_len: int) -> None:
        """Precompute cos/sin once weights are on their device (the model is built on meta)."""
        param = next(self.parameters())
        self.rope = RotaryTables(self.config, max_seq_len, param.device, param.dtype)

    def new_cache(self, max_seq_len: int, blocks: Sequence[int] | None = None) -> SessionCache:
        param = next(self.parameters())
        c = self.config
        return {
            i: KVCache(c.n_kv_heads, max_seq_len, c.head_dim, param.device, param.dtype)
            for i in (self.blocks if blocks is None else blocks)
        }

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> hidden (B, T, C)."""
        if self.model.embed_tokens is not None:
            return self.model.embed_tokens(tokens)
        assert self.head_proj is not None, "this part holds no embedding"
        return self.head_proj.rows(tokens)  # tied: the head's rows are the embedding

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start_pos: int,
        cache: SessionCache,
        blocks: Sequence[int],
    ) -> torch.Tensor:
        """Run consecutive `blocks` on hidden (B, T, C) at positions start_pos.. start_pos+T-1."""
        assert self.rope is not None, "call setup_rope() after loading weights"
        cos, sin = self.rope.at(start_pos, hidden.shape[1])
        for i in blocks:
            hidden = self.model.layers[str(i)](hidden, start_pos, cache[i], cos, sin)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, vocab), in float32."""
        assert self.head_proj is not None and self.model.norm is not None, "no head here"
        return self.head_proj(self.model.norm(hidden)).float()
