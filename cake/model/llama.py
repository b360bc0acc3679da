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

from cake.host.devices import weight_layout_in_out
from cake.model.config import LlamaConfig
from cake.model.kernels import fused
from cake.model.kv_cache import KVCache, Segment, SessionCache


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (C,)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        done = fused.rms_norm(x, self.weight, self.eps)  # f32 on the CPU: one native call
        if done is not None:
            return done
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

    Stored in the layout the device multiplies fastest, as `cake.host.devices.weight_layout_in_out`
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


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, qkv: nn.Module, out: nn.Module) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.qkv = qkv  # fused q_proj|k_proj|v_proj: hidden -> (nh + 2 * n_kv) * hd
        self.out = out  # o_proj

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.qkv(x)
        rotated = fused.rope_in_place(qkv, self.n_heads + self.n_kv_heads, self.head_dim, cos, sin)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        # q is a strided view of the fused output; lay it out densely for SDPA (cheap: T*nh*hd).
        q = q.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2).contiguous()
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, nh, T, hd); k, v: (B, n_kv, T, hd)
        if not rotated:
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

    def forward_segments(
        self,
        x: torch.Tensor,
        segments: Sequence[Segment],
        block: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Rows of several sessions at once: x (1, total, C), one segment of rows per session.

        The projections run once on all rows (every weight is read once per step, whatever the
        number of sessions); rope uses each row's own position (cos/sin are (total, hd)); each
        segment attends only to its own session's cache.
        """
        assert self.qkv is not None and self.out is not None, "call Llama.pack() first"
        _, total, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv = self.qkv(x)
        rotated = fused.rope_in_place(qkv, self.n_heads + self.n_kv_heads, self.head_dim, cos, sin)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(1, total, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(1, total, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(1, total, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if not rotated:
            q = apply_rope(q, cos, sin)  # (1, nh, total, hd)
            k = apply_rope(k, cos, sin)  # (1, n_kv, total, hd)
        outputs = []
        for segment in segments:
            rows = slice(segment.offset, segment.offset + segment.length)
            keys, values = segment.cache[block].update(
                segment.start_pos, k[:, :, rows], v[:, :, rows]
            )
            outputs.append(
                F.scaled_dot_product_attention(
                    q[:, :, rows],
                    keys,
                    values,
                    attn_mask=_causal_mask(segment.start_pos, segment.length, x.device),
                    is_causal=segment.start_pos == 0 and segment.length > 1,
                    enable_gqa=self.n_kv_heads != self.n_heads,
                )
            )  # (1, nh, length, hd)
        y = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        y = y.transpose(1, 2).reshape(1, total, q_size)
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
    def __init__(self, config: LlamaConfig, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.inner = config.intermediate_size
        self.gate_up = gate_up  # fused gate_proj|up_proj: hidden -> 2 * inner
        self.down = down  # down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        activated = fused.silu_mul(gate_up, self.inner)  # f32 on the CPU: one native call
        if activated is None:
            gate, up = gate_up.split([self.inner, self.inner], dim=-1)
            activated = F.silu(gate) * up
        return self.down(activated)


# The runtime's fused projections and the checkpoint tensors each is built from, in output order.
# Module names elsewhere equal the checkpoint's; these four are the exception, on purpose: one
# matrix call for q|k|v and one for gate|up is what decode speed needs.
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.out": ("self_attn.o_proj",),
    "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}


NORMS = ("input_layernorm", "post_attention_layernorm")


EMBEDDING = "model.embed_tokens.weight"


FINAL_NORM = "model.norm.weight"


HEAD = "lm_head.weight"


def checkpoint_shapes(
    config: LlamaConfig, blocks: Iterable[int], with_embedding: bool, with_head: bool
) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for the part of the model that holds `blocks` (and the
    embedding, and the final norm with the head). The one list of what a part reads."""
    c = config
    hidden, q_out, kv_out = c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_block = {
        "self_attn.q_proj.weight": (q_out, hidden),
        "self_attn.k_proj.weight": (kv_out, hidden),
        "self_attn.v_proj.weight": (kv_out, hidden),
        "self_attn.o_proj.weight": (hidden, q_out),
        "mlp.gate_proj.weight": (c.intermediate_size, hidden),
        "mlp.up_proj.weight": (c.intermediate_size, hidden),
        "mlp.down_proj.weight": (hidden, c.intermediate_size),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    shapes = {}
    if with_embedding:
        shapes[EMBEDDING] = (c.vocab_size, hidden)
    for i in sorted(blocks):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_block.items()})
    if with_head:
        shapes[FINAL_NORM] = (hidden,)
        shapes[HEAD] = (c.vocab_size, hidden)
    return shapes


class Block(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,
        projections: dict[str, nn.Module],
        norms: dict[str, torch.Tensor],
    ) -> None:
        """projections: PROJECTIONS' keys -> built modules; norms: NORMS -> weights (C,)."""
        super().__init__()
        self.self_attn = Attention(
            config, projections["self_attn.qkv"], projections["self_attn.out"]
        )
        self.mlp = MLP(config, projections["mlp.gate_up"], projections["mlp.down"])
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(norms["input_layernorm"], eps)
        self.post_attention_layernorm = RMSNorm(norms["post_attention_layernorm"], eps)

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

    def forward_segments(
        self,
        x: torch.Tensor,
        segments: Sequence[Segment],
        block: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn.forward_segments(
            self.input_layernorm(x), segments, block, cos, sin
        )
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The checkpoint's `model.` prefix: embedding, the blocks this process holds, final norm."""

    def __init__(
        self,
        embed_tokens: nn.Embedding | None,
        layers: dict[int, Block],
        norm: RMSNorm | None,
    ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        # ModuleDict keyed by the absolute block index gives the names `model.layers.{i}.*`.
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.norm = norm


class Llama(nn.Module):
    """Any part of a Llama model: some blocks, and optionally the embedding and/or the head.

    Built from finished modules (weights.load_llama builds them from a checkpoint): a tied head
    has no separate embedding; `head_proj` then doubles as the table (its `rows`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        layers: dict[int, Block],
        embed_tokens: nn.Embedding | None = None,
        norm: RMSNorm | None = None,
        head_proj: nn.Module | None = None,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(embed_tokens, layers, norm)
        self.head_proj = head_proj
        self.dtype = dtype  # the activations' dtype (hidden states, KV caches)
        self.device = device
        self.rope: RotaryTables | None = None

    @property
    def blocks(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def setup_rope(self, max_seq_len: int) -> None:
        """Precompute cos/sin for positions 0..max_seq_len-1 on the part's device and dtype."""
        self.rope = RotaryTables(self.config, max_seq_len, self.device, self.dtype)

    def new_cache(
        self, max_seq_len: int, blocks: Sequence[int] | None = None, page: int = 256
    ) -> SessionCache:
        """Empty growing caches for `blocks` (all of this part's by default); nothing allocated
        until positions are written. Sessions get theirs from a `SessionStore`."""
        c = self.config
        return {
            i: KVCache(c.n_kv_heads, c.head_dim, self.device, self.dtype, page, max_seq_len)
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

    def run_segments(
        self, hidden: torch.Tensor, segments: Sequence[Segment], blocks: Sequence[int]
    ) -> torch.Tensor:
        """Run `blocks` on the rows of several sessions at once: hidden (1, total, C).

        A single segment takes the one-session path (`run_blocks`), so a batch of one costs
        exactly what it did before batching existed.
        """
        assert self.rope is not None, "call setup_rope() after loading weights"
        if len(segments) == 1:
            only = segments[0]
            return self.run_blocks(hidden, only.start_pos, only.cache, blocks)
        positions = torch.cat(
            [torch.arange(s.start_pos, s.start_pos + s.length) for s in segments]
        ).to(self.rope.cos.device)  # (total,)
        cos, sin = self.rope.cos[positions], self.rope.sin[positions]  # (total, hd)
        for i in blocks:
            hidden = self.model.layers[str(i)].forward_segments(hidden, segments, i, cos, sin)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, vocab), in float32."""
        assert self.head_proj is not None and self.model.norm is not None, "no head here"
        return self.head_proj(self.model.norm(hidden)).float()
