"""
A GPT in one file, nanoGPT-style, with the seams post-training needs.

    logits, loss = model(idx, targets)            # training / scoring
    h = model.hidden(idx=..., embeds=..., positions=..., cache=...)   # (B, T, C), after ln_f
    logits = model.lm_head(h)                    # (B, T, V)

`hidden` is the one forward pass everything else goes through:
- `embeds` instead of `idx` feeds input vectors directly (Coconut feeds a hidden state back as
  the next input; `model.transformer.wte(idx)` gives the token part).
- `positions` (B, T) are explicit, so a ragged batch in a KV cache gets each row's own
  positions; without a cache they default to 0..T-1.
- `cache` is any object with `update(layer, k, v, positions) -> (k_all, v_all)` and
  `mask(positions) -> (B, 1, T, S) bool`: sampler.KVCache writes keys/values in place at their
  positions and lets a query at position p see its row's slots 0..p; sampler.SharedPrefix lets
  G completions of one prompt attend to that prompt's keys, computed once, with gradients.

Variants are one config field and one small class each: `pos` picks how positions enter
(learned table added to the input, rotary on q/k, nothing, or CoPE's contextual positions
inside attention, CoPEAttention), and `attn` picks the attention (standard, or Multi-Token
Attention's convolutions over the score map, MTAAttention).

GPT-2 interop: `GPT.from_hf(dir)` / `model.save_hf(dir)` read and write the Hugging Face GPT-2
layout (config.json + model.safetensors, Conv1D weights stored transposed).
"""
import inspect
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

POS_CHOICES = ("learned", "rope", "none", "cope")
ATTN_CHOICES = ("standard", "mta")


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    block_size: int = 1024   # longest sequence (positions 0..block_size-1)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True        # biases in Linear and LayerNorm, as in GPT-2
    pos: str = "learned"     # learned | rope | none | cope
    attn: str = "standard"   # standard | mta
    rope_base: float = 10000.0
    npos_max: int = 64       # cope: positions counted up to npos_max - 1
    # mta (arXiv 2504.00927; defaults are the paper's language-model setting)
    mta_cq: int = 6          # key-query kernel: current and c_q - 1 earlier queries ...
    mta_ck: int = 11         # ... by c_k keys centred on the key (odd)
    mta_kq: str = "pre"      # key-query convolution before or after the softmax: pre | post
    mta_every: int = 4       # key-query convolution on layers every-1, 2*every-1, ... (1: all)
    mta_ch: int = 2          # head mixing within groups of c_h heads (1: none)
    mta_head: str = "post"   # head mixing before or after the softmax: pre | post
    mta_norm: str = "gate"   # per-head RMSNorm of the output, then: gate | scale | none (no norm)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pos not in POS_CHOICES:
            raise ValueError(f"GPTConfig.pos must be one of {POS_CHOICES}, got {self.pos!r}")
        if self.attn not in ATTN_CHOICES:
            raise ValueError(f"GPTConfig.attn must be one of {ATTN_CHOICES}, got {self.attn!r}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("GPTConfig: pos='rope' needs an even head size (n_embd // n_head)")
        if self.pos == "cope" and self.attn != "standard":
            raise ValueError("GPTConfig: pos='cope' is its own attention; it needs attn='standard'")
        if self.attn == "mta":
            for name in ("mta_cq", "mta_ck", "mta_every", "mta_ch"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"GPTConfig.{name} must be a positive int, got {v!r}")
            if self.mta_ck % 2 == 0:
                raise ValueError(f"GPTConfig.mta_ck must be odd (the kernel is centred on the key), "
                                 f"got {self.mta_ck}")
            if self.n_head % self.mta_ch:
                raise ValueError(f"GPTConfig: n_head={self.n_head} is not divisible by mta_ch={self.mta_ch}")
            for name, allowed in (("mta_kq", ("pre", "post")), ("mta_head", ("pre", "post")),
                                  ("mta_norm", ("gate", "scale", "none"))):
                if getattr(self, name) not in allowed:
                    raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.npos_max, int) or self.npos_max < 2:
            raise ValueError(f"GPTConfig.npos_max must be an int >= 2, got {self.npos_max!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, d):
        """Build from a dict, rejecting keys that are not fields (a typo must not pass silently)."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {unknown}; valid fields are {sorted(valid)}")
        return cls(**d)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 in every path)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864), rotate-half convention.
    Pairs (x_i, x_{i+D/2}) are rotated by angle pos * base^(-2i/D)."""

    def __init__(self, head_dim, block_size, base):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, positions):  # x (B, H, T, D), positions (B, T)
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # (B, 1, T, D/2)
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer=0):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.rotary = Rotary(head_dim, config.block_size, config.rope_base) if config.pos == "rope" else None

    def qkv(self, x, positions):
        """x (B, T, C) -> q, k, v (B, H, T, D), rotary applied."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def forward(self, x, positions, mask, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions)  # (B, H, max_len, D)
        y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(D) + mask) v. mask None means plain causal over the sequence;
        otherwise a bool (B, 1, T, S) tensor, True where a query may see a key."""
        p = self.dropout if self.training else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class CoPEAttention(CausalSelfAttention):
    """Contextual Position Encoding (Golovneva et al., arXiv 2405.18719): a key's position is not
    its token distance but the number of keys between it and the query whose gate is open, so a
    head can count words, sentences or a chosen token instead of tokens.
        g_ij = sigmoid(q_i . k_j / sqrt(D))              for visible keys j (0 for masked ones)
        p_ij = min(sum_{t=j..i} g_it, npos_max - 1)       (a reverse cumulative sum, eq. 3)
        e(p) = (1 - w) e[floor p] + w e[ceil p],  w = p - floor p   (learned e: D x npos_max)
        a_ij = softmax_j((q_i . k_j + q_i . e(p_ij)) / sqrt(D) + mask)
    q_i . e[p] is computed once for the npos_max integer positions, (B, H, T, npos_max), then
    gathered and interpolated, instead of forming an embedding per (i, j) pair (sec. 3). The
    slow twin is cope_attention_reference. The mask may come from a KV cache: masked slots get
    a zero gate, so they neither count nor are seen."""

    def __init__(self, config, layer=0):
        super().__init__(config)
        self.npos_max = config.npos_max
        # one table per layer, shared by its heads; zero init: attention starts position-free
        self.pos_emb = nn.Parameter(torch.zeros(config.n_embd // config.n_head, config.npos_max))

    def positions(self, logits, mask):
        """p_ij (B, H, T, S) from the scaled logits q.k / sqrt(D): gates summed from key j to the
        query (masked keys count 0), clamped to npos_max - 1."""
        gates = torch.sigmoid(logits).masked_fill(~mask, 0.0)
        return gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.npos_max - 1)

    def attend(self, q, k, v, mask):
        T, S, D = q.size(2), k.size(2), q.size(-1)
        if mask is None:  # plain causal over the sequence
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, S)
        pos = self.positions(logits, mask)
        pos_floor = pos.floor()
        w = pos - pos_floor
        logits_int = q @ self.pos_emb.to(q.dtype)  # (B, H, T, npos_max)
        lo = logits_int.gather(-1, pos_floor.long())
        hi = logits_int.gather(-1, pos.ceil().long())
        logits = logits + ((1 - w) * lo + w * hi) / math.sqrt(D)
        att = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        att = F.dropout(att, self.dropout, self.training)
        return att @ v


def cope_attention_reference(q, k, v, pos_emb, mask=None):
    """The slow, obvious twin of CoPEAttention.attend: loops over queries i and keys j, summing the
    gates one by one and interpolating the embedding itself. q, k, v (B, H, T, D) (k, v may be
    longer: (B, H, S, D), the last T slots aligned with the queries when mask is None); pos_emb
    (D, npos_max); mask (B, 1, T, S) bool or None (causal)."""
    B, H, T, D = q.shape
    S, npos = k.size(2), pos_emb.size(1)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                seen = [j for j in range(S) if (mask[b, 0, i, j] if mask is not None else j <= i + S - T)]
                qk = {j: (q[b, h, i] @ k[b, h, j]) / math.sqrt(D) for j in seen}
                logits = []
                for j in seen:
                    p = sum(torch.sigmoid(qk[t]) for t in seen if t >= j)
                    p = torch.clamp(p, max=npos - 1)
                    f = math.floor(p.item())
                    w = p - f
                    e = (1 - w) * pos_emb[:, f] + w * pos_emb[:, min(f + 1, npos - 1)]
                    logits.append(qk[j] + (q[b, h, i] @ e) / math.sqrt(D))
                att = torch.softmax(torch.stack(logits), dim=0)
                out[b, h, i] = sum(a * v[b, h, j] for a, j in zip(att, seen))
    return out


def visible_softmax(a, seen):
    """softmax over the keys a query may see; 0 elsewhere. A row that sees nothing (an MTA
    history row before position 0) gives zeros, without the NaN a softmax of all -inf would
    send into the backward."""
    some = seen.any(-1, keepdim=True)
    return torch.softmax(a.masked_fill(some & ~seen, float("-inf")), dim=-1).masked_fill(~seen, 0.0)


class MTAAttention(CausalSelfAttention):
    """Multi-Token Attention (Golovneva et al., arXiv 2504.00927): a key's weight may depend on
    several queries, keys and heads at once, so a query can look for "the block holding both
    a and b" although no single key holds both.
        A_ij = q_i . k_j / sqrt(D) for visible keys, 0 for hidden ones      (zeroed before the conv)
        A'_ij = sum_{a < c_q, s < c_k} w[a, s] A_{i - (c_q - 1 - a), j + s - c_k // 2}   (key-query conv)
        att = softmax(A' + mask)             (mta_kq="post": softmax first, then the convolution)
        att_h = sum_{h' in h's group} W[h, h'] att_h'   (head mixing conv, groups of c_h)
        y_h = att_h v_h;  y_h = RMSNorm(y_h) * (1 - lambda_l)  or  * sigmoid(g . y_h + b)  (group norm)
    with lambda_l = 0.8 - 0.6 exp(-0.3 l) for layer l. The kernel looks only at the current and
    earlier queries and at keys the query itself may see (they are zero before the convolution
    and -inf after it), so nothing leaks from the future. Kernels start at the identity (current
    query, centre key; W = I): at init the layer is standard attention plus the output norm.

    Without a cache the convolution runs once over the (T, T) score map. With a KV cache a query
    needs the score rows of its c_q - 1 predecessors too, so the cache keeps queries
    (cache.update_queries) and each query gets a (c_q, S) stack of rows: the same pipeline run on
    that stack, of which the last row is kept. The slow twin is mta_attention_reference."""

    def __init__(self, config, layer=0):
        super().__init__(config)
        H, D = config.n_head, config.n_embd // config.n_head
        self.kq_where, self.head_where, self.norm = config.mta_kq, config.mta_head, config.mta_norm
        self.mta_kq = None  # (H, 1, c_q, c_k), on every mta_every-th layer (paper: every 4th)
        if (layer + 1) % config.mta_every == 0:
            w = torch.zeros(H, 1, config.mta_cq, config.mta_ck)
            w[:, 0, -1, config.mta_ck // 2] = 1.0
            self.mta_kq = nn.Parameter(w)
        ch = config.mta_ch
        self.mta_heads = nn.Parameter(torch.eye(ch).repeat(H // ch, 1, 1)) if ch > 1 else None  # (H/c_h, c_h, c_h)
        if self.norm != "none":
            self.head_norm = nn.RMSNorm(D, eps=1e-5)  # one gain over head_dim, shared by the heads
        if self.norm == "gate":
            self.gate = nn.Linear(D, 1)
        # the depth-dependent scale MTA takes from Differential Transformer (arXiv 2410.05258)
        self.out_scale = 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer))

    def kq_conv(self, a):
        """(N, H, R, S) -> (N, H, R, S): the c_q x c_k convolution per head, over R consecutive
        query rows (c_q - 1 zero rows above the first: no earlier query) and S keys (c_k // 2
        zeros each side). conv2d is a cross-correlation, so w[:, 0, -1] weighs the row itself."""
        cq, ck = self.mta_kq.shape[-2:]
        return F.conv2d(F.pad(a, (ck // 2, ck // 2, cq - 1, 0)), self.mta_kq.to(a.dtype), groups=a.size(1))

    def mix_heads(self, a):
        """(N, H, R, S): within each group of c_h heads, head h becomes sum_h' W[g, h, h'] a_h'."""
        N, H, R, S = a.shape
        g, ch, _ = self.mta_heads.shape
        mixed = torch.einsum("gxy,ngyrs->ngxrs", self.mta_heads.to(a.dtype), a.view(N, g, ch, R, S))
        return mixed.reshape(N, H, R, S)

    def attention_map(self, a, seen):
        """Scores a (N, H, R, S) of R consecutive queries, seen (N, 1, R, S) bool -> attention
        weights (N, H, R, S), 0 where not seen. Every step but the convolution is per row."""
        a = a.masked_fill(~seen, 0.0)
        if self.mta_kq is not None and self.kq_where == "pre":
            a = self.kq_conv(a)
        if self.mta_heads is not None and self.head_where == "pre":
            a = self.mix_heads(a)
        att = visible_softmax(a, seen)
        if self.mta_kq is not None and self.kq_where == "post":
            att = self.kq_conv(att).masked_fill(~seen, 0.0)
        if self.mta_heads is not None and self.head_where == "post":
            att = self.mix_heads(att)
        return att

    def attend(self, q, k, v, mask):
        """Without a cache: y (B, H, T, D) before the output norm; mask None is causal."""
        T, S = q.size(2), k.size(2)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        att = self.attention_map((q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1)), mask)
        return F.dropout(att, self.dropout, self.training) @ v

    def attend_cached(self, q, k, v, positions, cache, layer):
        """With a KV cache: query i at position p gets the rows of the queries at p - c_q + 1 .. p
        (stored in the cache), each masked as the cache masks that position."""
        if not hasattr(cache, "update_queries"):
            raise TypeError(f"MTA's key-query convolution needs the queries of earlier positions, "
                            f"which {type(cache).__name__} does not keep (sampler.KVCache does); "
                            f"use it, or run without a cache")
        B, H, T, D = q.shape
        S, cq = k.size(2), self.mta_kq.size(-2)
        q_all = cache.update_queries(layer, q, positions)  # (B, H, max_len, D)
        hist = positions[:, :, None] - torch.arange(cq - 1, -1, -1, device=q.device)  # (B, T, c_q), oldest first
        valid = hist >= 0
        hist = hist.clamp(min=0)
        qh = q_all[torch.arange(B, device=q.device)[:, None, None], :, hist]  # (B, T, c_q, H, D)
        a = torch.einsum("btrhd,bhsd->bthrs", qh, k) / math.sqrt(D)
        seen = cache.mask(hist.view(B, T * cq)).view(B, T, cq, S) & valid[..., None]
        att = self.attention_map(a.reshape(B * T, H, cq, S), seen.view(B * T, 1, cq, S))[:, :, -1]
        att = att.view(B, T, H, S).transpose(1, 2)
        return F.dropout(att, self.dropout, self.training) @ v

    def forward(self, x, positions, mask, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions)
        if cache is not None and self.mta_kq is not None:
            y = self.attend_cached(q, k, v, positions, cache, layer)
        else:
            y = self.attend(q, k, v, mask)
        if self.norm != "none":
            y = self.head_norm(y)
            y = y * torch.sigmoid(self.gate(y)) if self.norm == "gate" else y * self.out_scale
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


def mta_attention_reference(q, k, v, kq=None, heads=None, kq_where="pre", head_where="post"):
    """The slow, obvious twin of MTAAttention.attend (causal, no cache): every score, convolution
    tap, head-mixing term and softmax written out as loops over scalars. q, k, v (B, H, T, D);
    kq (H, 1, c_q, c_k) or None; heads (H / c_h, c_h, c_h) or None."""
    B, H, T, D = q.shape

    def scores(b, h):  # A_ij, 0 where j > i
        return [[(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) if j <= i else q.new_zeros(()) for j in range(T)]
                for i in range(T)]

    def conv(m, h):  # sum over kernel taps; rows before 0 and keys outside 0..T-1 are 0
        cq, ck = kq.shape[-2:]
        out = [[q.new_zeros(()) for _ in range(T)] for _ in range(T)]
        for i in range(T):
            for j in range(T):
                for a in range(cq):
                    for s in range(ck):
                        i2, j2 = i - (cq - 1 - a), j + s - ck // 2
                        if 0 <= i2 and 0 <= j2 < T:
                            out[i][j] = out[i][j] + kq[h, 0, a, s] * m[i2][j2]
        return out

    def mix(ms):  # ms[h] is head h's (T, T) map
        ch = heads.size(1)
        return [[[sum(heads[h // ch, h % ch, y] * ms[h - h % ch + y][i][j] for y in range(ch))
                  for j in range(T)] for i in range(T)] for h in range(H)]

    def softmax_causal(m):
        out = []
        for i in range(T):
            e = [torch.exp(m[i][j]) for j in range(i + 1)]
            z = sum(e)
            out.append([e[j] / z if j <= i else q.new_zeros(()) for j in range(T)])
        return out

    y = torch.zeros_like(q)
    for b in range(B):
        ms = [scores(b, h) for h in range(H)]
        if kq is not None and kq_where == "pre":
            ms = [conv(ms[h], h) for h in range(H)]
        if heads is not None and head_where == "pre":
            ms = mix(ms)
        ms = [softmax_causal(m) for m in ms]
        if kq is not None and kq_where == "post":
            ms = [[[x if j <= i else q.new_zeros(()) for j, x in enumerate(row)]
                   for i, row in enumerate(conv(ms[h], h))] for h in range(H)]
        if heads is not None and head_where == "post":
            ms = mix(ms)
        for h in range(H):
            for i in range(T):
                y[b, h, i] = sum(ms[h][i][j] * v[b, h, j] for j in range(T))
    return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; exact GELU differs by ~1e-3
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


ATTENTION = {"standard": CausalSelfAttention, "mta": MTAAttention}


class Block(nn.Module):

    def __init__(self, config, layer=0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CoPEAttention(config) if config.pos == "cope" else ATTENTION[config.attn](config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, positions, mask, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), positions, mask, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) at init
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position table is left out by default (as in nanoGPT), the token
        table is counted because it is tied to lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx=None, embeds=None, positions=None, cache=None):
        """Final hidden states (B, T, C) after ln_f. Give exactly one of idx (B, T) or embeds
        (B, T, C). positions (B, T) default to 0..T-1; with a cache they are required."""
        if (idx is None) == (embeds is None):
            raise ValueError("GPT.hidden: give exactly one of idx or embeds")
        x = embeds if embeds is not None else self.transformer.wte(idx)
        B, T, _ = x.shape
        if positions is None:
            if cache is not None:
                raise ValueError("GPT.hidden: a KV cache needs explicit positions (B, T)")
            if T > self.config.block_size:
                raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=x.device).expand(B, T)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        # with a cache, the cache knows its slot layout and says which slots each query may see
        mask = None if cache is None else cache.mask(positions)  # (B, 1, T, S) bool
        for i, block in enumerate(self.transformer.h):
            x = block(x, positions, mask, cache, i)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """logits (B, T, V) for every position; loss is the mean cross-entropy over targets
        that are not -100 (None without targets)."""
        logits = self.lm_head(self.hidden(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), device_type="cpu"):
        """AdamW; matrices (dim >= 2) decay, biases and norm gains do not, nor do MTA's kernels
        (they start at the identity; decay would pull them towards attending to nothing).
        Fused kernel on CUDA."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p.dim() >= 2 and ".mta_" not in n for n, p in named]
        groups = [
            {"params": [p for (_, p), d in zip(named, decay) if d], "weight_decay": weight_decay},
            {"params": [p for (_, p), d in zip(named, decay) if not d], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, fwdbwd_per_iter, dt, seq_len=None, peak_flops=312e12):
        """Model FLOPs utilisation: achieved FLOP/s over peak_flops (default: A100 bf16 dense).
        FLOPs per token = 6N + 12 L H Q T (PaLM, arXiv 2204.02311, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        N = self.get_num_params()
        flops_per_token = 6 * N + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    # ---- GPT-2 (Hugging Face layout) in and out -------------------------------------------

    # HF's GPT-2 uses Conv1D, whose weight is (in, out): the transpose of nn.Linear's.
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_hf(cls, path, **overrides):
        """Load a directory in Hugging Face GPT-2 layout (config.json + model.safetensors).
        overrides (e.g. dropout=0.1) are applied to the config; nothing is downloaded."""
        from safetensors.torch import load_file
        cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"GPT.from_hf: {p} not found (expected HF GPT-2 layout)")
        with open(cfg_path) as f:
            hf = json.load(f)
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"GPT.from_hf: {cfg_path} has model_type {hf.get('model_type')!r}, expected 'gpt2'")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT.from_hf: activation_function {act!r} is not supported (GPT-2 uses gelu_new)")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
            raise ValueError(f"GPT.from_hf: n_inner={hf['n_inner']} is not supported (only 4 * n_embd)")
        config = GPTConfig.from_dict(dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                                          n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                                          dropout=0.0, bias=True, pos="learned", **overrides))
        model = cls(config)
        sd = {k.removeprefix("transformer."): v for k, v in load_file(w_path).items()}
        sd.pop("lm_head.weight", None)  # tied to wte
        ours = {k.removeprefix("transformer."): k for k in model.state_dict() if k != "lm_head.weight"}
        theirs = {k for k in sd if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing, unexpected = sorted(set(ours) - theirs), sorted(theirs - set(ours))
        if missing or unexpected:
            raise ValueError(f"GPT.from_hf: {w_path} does not match the config: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            target = model.state_dict()
            for short, full in ours.items():
                w = sd[short].t() if short.endswith(cls._CONV1D) else sd[short]
                if w.shape != target[full].shape:
                    raise ValueError(f"GPT.from_hf: {short} has shape {tuple(w.shape)}, "
                                     f"expected {tuple(target[full].shape)}")
                target[full].copy_(w)
        return model

    def save_hf(self, path):
        """Write config.json + model.safetensors in Hugging Face GPT-2 layout. Only the GPT-2
        shape can be written: learned positions, standard attention (bias=False is written as
        zero biases, which is exact)."""
        from safetensors.torch import save_file
        cfg = self.config
        if cfg.pos != "learned" or cfg.attn != "standard":
            raise ValueError(f"GPT.save_hf: the GPT-2 layout needs pos='learned' and attn='standard', "
                             f"this model has pos={cfg.pos!r}, attn={cfg.attn!r}")
        sd = {}
        for name, p in self.state_dict().items():
            if name == "lm_head.weight":
                continue  # tied to wte; HF GPT-2 checkpoints store it once
            p = p.detach().float().cpu()
            sd[name] = (p.t() if name.endswith(self._CONV1D) else p).contiguous()
        if not cfg.bias:  # GPT-2 always has biases; zeros make the layout exact
            for name in list(sd):
                if name.endswith(".weight") and ("ln_" in name or name.endswith(self._CONV1D)):
                    out = sd[name].shape[-1] if name.endswith(self._CONV1D) else sd[name].shape[0]
                    sd[name[:-len("weight")] + "bias"] = torch.zeros(out)
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                  n_positions=cfg.block_size, n_ctx=cfg.block_size, n_embd=cfg.n_embd,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=None, activation_function="gelu_new",
                  layer_norm_epsilon=1e-5, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                  attn_pdrop=cfg.dropout, tie_word_embeddings=True, initializer_range=0.02,
                  bos_token_id=None, eos_token_id=None)
        os.makedirs(path, exist_ok=True)
        # write to temp names and rename, so a crash never leaves a half-written checkpoint
        save_file(sd, os.path.join(path, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json.tmp"), "w") as f:
            json.dump(hf, f, indent=2)
        os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))
