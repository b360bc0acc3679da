"""Our own transformer: RMSNorm, RoPE, GQA attention, a gated MLP or a router and experts.

One block for every family (cake/model/families.py): Llama's, with what a family changes
switched on by its config (q/k/v biases, per-head q/k norms, norms after attention and MLP,
sliding windows, soft-capping, partial rotary, experts). Blocks are keyed by their absolute
index, so a process that holds only blocks 6-16 builds exactly those (cake/model/layout.py names
the tensors each reads). A `Llama` holds any subset of the model: the master holds the embedding
and the head, a worker holds a few blocks. No networking here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cake.host.devices import weight_layout_in_out
from cake.model.config import LlamaConfig
from cake.model.kernels import fused
from cake.model.kv_cache import KVCache, Segment, SessionCache
from cake.model.layout import ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT


class RMSNorm(nn.Module):
    """weight: the scale as it multiplies, (C,). Gemma stores w and scales by (1 + w): its
    loader adds the offset once (in float32) and sets scale_in_float, as Gemma's reference
    scales before rounding to the activations' dtype."""

    def __init__(self, weight: torch.Tensor, eps: float, scale_in_float: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (C,)
        self.eps = eps
        self.scale_in_float = scale_in_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        done = fused.rms_norm(x, self.weight, self.eps)  # f32 on the CPU: one native call
        if done is not None:
            return done
        # Normalise in float32 and scale in the input dtype, as the reference does, so that
        # bf16/f16 results match it bit for bit where possible.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_float:
            return (x32 * self.weight.float()).to(dtype)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: LlamaConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) of the global layers' RoPE, with its scaling; `local`:
    the sliding-window layers' own plain RoPE (Gemma 3). `long`: LongRoPE's long factors (for a
    sequence past the original context) instead of its short ones."""
    dim = config.rotary_dim or config.head_dim
    theta = config.local_rope_theta if local and config.local_rope_theta else config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = None if local else config.rope_scaling
    if scaling is not None and config.rope_type == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"])
        return 1.0 / (factors * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if config.rope_type == "linear":
        return inv_freq / scaling["factor"]
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


def rope_attention_factor(config: LlamaConfig, local: bool = False) -> float:
    """What LongRoPE multiplies cos and sin by (1 for other types)."""
    scaling = config.rope_scaling
    if local or scaling is None or config.rope_type != "longrope":
        return 1.0
    if "attention_factor" in scaling:
        return scaling["attention_factor"]
    original = scaling["original_max_position_embeddings"]
    factor = config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RotaryTables:
    """cos/sin for every position up to `max_seq_len`, computed once: (max_seq_len, rotary_dim).
    `local`: the sliding-window layers' tables (Gemma 3).

    LongRoPE (Phi-3) has two sets of factors: a forward whose sequence reaches past the original
    context (its last position + 1 > original_max_position_embeddings) rotates with the long
    ones, any other with the short ones, as transformers does. So the choice depends on the
    positions of a forward only, not on a process's --max-seq-len: master and workers agree.
    """

    def __init__(
        self,
        config: LlamaConfig,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
        local: bool = False,
    ) -> None:
        factor = rope_attention_factor(config, local)
        scaling = None if local else config.rope_scaling
        self.long_from: int | None = None  # forwards ending past this position use `long`
        if scaling is not None and config.rope_type == "longrope":
            self.long_from = int(scaling["original_max_position_embeddings"])
        self.cos, self.sin = self._tables(config, max_seq_len, local, False, factor, device, dtype)
        self.long = None
        if self.long_from is not None and max_seq_len > self.long_from:
            self.long = self._tables(config, max_seq_len, local, True, factor, device, dtype)
        self.max_seq_len = max_seq_len

    @staticmethod
    def _tables(
        config: LlamaConfig,
        max_seq_len: int,
        local: bool,
        long: bool,
        factor: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config, local, long))  # (S, rd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, rd)
        cos, sin = emb.cos() * factor, emb.sin() * factor
        return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)

    def _for(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.long is not None and self.long_from is not None and end > self.long_from:
            return self.long
        return self.cos, self.sin

    def at(self, start_pos: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._for(start_pos + length)
        return cos[start_pos : start_pos + length], sin[start_pos : start_pos + length]

    def rows(self, segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (total, rd) for the rows of several sessions, each at its own positions."""
        parts = [self.at(s.start_pos, s.length) for s in segments]
        return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (T, rd) broadcast over batch and heads. With partial rotary
    # (rd < hd) only the first rd dims of each head turn.
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        turned, kept = x[..., :rotary], x[..., rotary:]
        return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)
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
    """Grouped-query attention over the session's KV cache, with what a family adds: q/k/v
    biases, per-head q/k norms, its own scale, a sliding window, partial rotary."""

    def __init__(
        self,
        config: LlamaConfig,
        block: int,
        qkv: nn.Module,
        out: nn.Module,
        bias: torch.Tensor | None = None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.qkv = qkv  # fused q_proj|k_proj|v_proj: hidden -> (nh + 2 * n_kv) * hd
        self.out = out  # o_proj
        self.qkv_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale = config.attention_scale  # None: 1/sqrt(head_dim)
        self.window = config.sliding_window if config.is_sliding(block) else None
        self.partial_rotary = config.rotary_dim not in (None, config.head_dim)

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, nh, T, hd), k and v (B, n_kv, T, hd), rotated."""
        batch, length, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        if self.q_norm is not None and self.k_norm is not None:
            heads = qkv.view(batch, length, nh + 2 * nkv, hd)
            heads[:, :, :nh] = self.q_norm(heads[:, :, :nh])
            heads[:, :, nh : nh + nkv] = self.k_norm(heads[:, :, nh : nh + nkv])
        rotated = not self.partial_rotary and fused.rope_in_place(qkv, nh + nkv, hd, cos, sin)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        # q is a strided view of the fused output; lay it out densely for SDPA (cheap: T*nh*hd).
        q = q.reshape(batch, length, nh, hd).transpose(1, 2).contiguous()
        k = k.reshape(batch, length, nkv, hd).transpose(1, 2)
        v = v.reshape(batch, length, nkv, hd).transpose(1, 2)
        if not rotated:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        return q, k, v

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        """q (B, nh, T, hd) at positions start_pos.. against the cache's keys and values."""
        length = q.shape[2]
        mask = _attention_mask(start_pos, length, self.window, q.device)
        return F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            # From position 0 with no window the mask is plain causal: the kernel then skips
            # the masked half.
            is_causal=mask is None and start_pos == 0 and length > 1,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, nh, T, hd)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        keys, values = cache.update(start_pos, k, v)  # (B, n_kv, start_pos + T, hd)
        y = self._attend(q, keys, values, start_pos)
        y = y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
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
        number of sessions); rope uses each row's own position (cos/sin are (total, rd)); each
        segment attends only to its own session's cache.
        """
        _, total, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        outputs = []
        for segment in segments:
            rows = slice(segment.offset, segment.offset + segment.length)
            keys, values = segment.cache[block].update(
                segment.start_pos, k[:, :, rows], v[:, :, rows]
            )
            outputs.append(self._attend(q[:, :, rows], keys, values, segment.start_pos))
        y = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
        y = y.transpose(1, 2).reshape(1, total, self.n_heads * self.head_dim)
        return self.out(y)


def _attention_mask(
    start_pos: int, length: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Query t (at position p = start_pos + t) sees keys p - window < key <= p (any key <= p
    with no window). None where nothing is hidden (one query, no window in reach) or where
    SDPA's own causal mask fits (from position 0, no window in reach)."""
    end = start_pos + length
    in_reach = window is not None and end > window
    if not in_reach and (length == 1 or start_pos == 0):
        return None
    query_pos = torch.arange(start_pos, end, device=device)[:, None]
    key_pos = torch.arange(end, device=device)[None, :]
    mask = key_pos <= query_pos  # (T, start_pos + T) bool
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class MLP(nn.Module):
    """down(act(gate) * up), with gate|up one fused projection."""

    def __init__(self, inner: int, gate_up: nn.Module, down: nn.Module, activation: str) -> None:
        super().__init__()
        self.inner = inner
        self.gate_up = gate_up  # fused gate_proj|up_proj: hidden -> 2 * inner
        self.down = down  # down_proj
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        activated = None
        if self.activation == "silu":
            activated = fused.silu_mul(gate_up, self.inner)  # f32 on the CPU: one native call
        if activated is None:
            gate, up = gate_up.split([self.inner, self.inner], dim=-1)
            activated = ACTIVATIONS[self.activation](gate) * up
        return self.down(activated)


class SparseMoE(nn.Module):
    """A router and experts (Qwen3-MoE, Mixtral): each row goes through its top-k experts only,
    weighted by their softmax probabilities (renormalised over the k where the family does).

    Rows are grouped by expert, so each routed expert runs once per step on all its rows and an
    expert no row chose is never read: a decode step reads k experts' bytes, not all of them.
    """

    def __init__(self, config: LlamaConfig, router: nn.Module, experts: Sequence[MLP]) -> None:
        super().__init__()
        self.router = router  # hidden -> n_experts, float
        self.experts = nn.ModuleList(experts)
        self.top_k = config.experts_per_token
        self.normalize = config.normalize_expert_weights
        # Rows each expert took, since load (`--stats`: expert load balance).
        self.register_buffer(
            "routed", torch.zeros(len(experts), dtype=torch.int64), persistent=False
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C) -> weights (N, k) and experts (N, k)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        self.routed += torch.bincount(chosen.flatten(), minlength=len(self.experts)).to(
            self.routed.device
        )
        out = torch.zeros_like(flat)
        if flat.shape[0] == 1:  # decode: the k chosen experts, in expert order
            for expert, weight in sorted(zip(chosen[0].tolist(), weights[0], strict=True)):
                out += self.experts[expert](flat) * weight
            return out.view(x.shape)
        for expert in chosen.unique().tolist():
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            y = self.experts[expert](flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out.view(x.shape)


class Block(nn.Module):
    """Attention then MLP, each with a residual: x + attn_out(attention(attn_in(x))), then
    h + mlp_out(mlp(mlp_in(h))); attn_out and mlp_out only where the family has them (Gemma 3).
    """

    def __init__(
        self,
        attention: Attention,
        mlp: nn.Module,
        norms: dict[str, RMSNorm],
    ) -> None:
        """norms: layout's roles (ATTENTION_IN, MLP_IN, and optionally ATTENTION_OUT, MLP_OUT)."""
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.attn_in = norms[ATTENTION_IN]
        self.mlp_in = norms[MLP_IN]
        self.attn_out = norms.get(ATTENTION_OUT)
        self.mlp_out = norms.get(MLP_OUT)

    def projections(self) -> list[nn.Module]:
        """The block's linear projections (an expert's too; not the router)."""
        mlps = list(self.mlp.experts) if isinstance(self.mlp, SparseMoE) else [self.mlp]
        found = [self.self_attn.qkv, self.self_attn.out]
        for mlp in mlps:
            found += [mlp.gate_up, mlp.down]
        return found

    def _mlp_part(self, h: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.mlp_in(h))
        return h + (self.mlp_out(y) if self.mlp_out is not None else y)

    def _residual(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return x + (self.attn_out(attended) if self.attn_out is not None else attended)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        cache: KVCache,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn(self.attn_in(x), start_pos, cache, cos, sin)
        return self._mlp_part(self._residual(x, attended))

    def forward_segments(
        self,
        x: torch.Tensor,
        segments: Sequence[Segment],
        block: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn.forward_segments(self.attn_in(x), segments, block, cos, sin)
        return self._mlp_part(self._residual(x, attended))


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
        self.local_rope: RotaryTables | None = None  # sliding-window layers' own (Gemma 3)

    @property
    def blocks(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def setup_rope(self, max_seq_len: int) -> None:
        """Precompute cos/sin for positions 0..max_seq_len-1 on the part's device and dtype."""
        self.rope = RotaryTables(self.config, max_seq_len, self.device, self.dtype)
        if self.config.local_rope_theta is not None:
            self.local_rope = RotaryTables(
                self.config, max_seq_len, self.device, self.dtype, local=True
            )

    def _tables(self, block: int) -> RotaryTables:
        assert self.rope is not None, "call setup_rope() after loading weights"
        if self.local_rope is not None and self.config.is_sliding(block):
            return self.local_rope
        return self.rope

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
            hidden = self.model.embed_tokens(tokens)
        else:
            assert self.head_proj is not None, "this part holds no embedding"
            hidden = self.head_proj.rows(tokens)  # tied: the head's rows are the embedding
        scale = self.config.embedding_scale
        if scale != 1.0:  # Gemma: rounded to the activations' dtype first, as its reference
            hidden = hidden * torch.tensor(scale, dtype=hidden.dtype)
        return hidden

    def run_blocks(
        self,
        hidden: torch.Tensor,
        start_pos: int,
        cache: SessionCache,
        blocks: Sequence[int],
    ) -> torch.Tensor:
        """Run consecutive `blocks` on hidden (B, T, C) at positions start_pos.. start_pos+T-1."""
        for i in blocks:
            cos, sin = self._tables(i).at(start_pos, hidden.shape[1])
            hidden = self.model.layers[str(i)](hidden, start_pos, cache[i], cos, sin)
        return hidden

    def run_segments(
        self, hidden: torch.Tensor, segments: Sequence[Segment], blocks: Sequence[int]
    ) -> torch.Tensor:
        """Run `blocks` on the rows of several sessions at once: hidden (1, total, C).

        A single segment takes the one-session path (`run_blocks`), so a batch of one costs
        exactly what it did before batching existed.
        """
        if len(segments) == 1:
            only = segments[0]
            return self.run_blocks(hidden, only.start_pos, only.cache, blocks)
        for i in blocks:
            cos, sin = self._tables(i).rows(segments)  # (total, rd)
            hidden = self.model.layers[str(i)].forward_segments(hidden, segments, i, cos, sin)
        return hidden

    def expert_load(self, blocks: Sequence[int] | None = None) -> torch.Tensor | None:
        """Rows each expert took since load, summed over this part's mixture-of-experts blocks
        (those of `blocks`, if given): (n_experts,), or None where none is sparse."""
        counts = [
            mlp.routed
            for i in (self.blocks if blocks is None else blocks)
            if isinstance(mlp := self.model.layers[str(i)].mlp, SparseMoE)
        ]
        return torch.stack(counts).sum(0).cpu() if counts else None

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, C) -> logits (B, T, vocab), in float32."""
        assert self.head_proj is not None and self.model.norm is not None, "no head here"
        logits = self.head_proj(self.model.norm(hidden)).float()
        cap = self.config.final_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)
