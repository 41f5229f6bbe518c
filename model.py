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
inside attention, CoPEAttention), and `attn` variants subclass `CausalSelfAttention.attend`.

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
ATTN_CHOICES = ("standard",)


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
    attn: str = "standard"
    rope_base: float = 10000.0
    npos_max: int = 64       # cope: positions counted up to npos_max - 1

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

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.rotary = Rotary(head_dim, config.block_size, config.rope_base) if config.pos == "rope" else None

    def forward(self, x, positions, mask, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
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

    def __init__(self, config):
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


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"; exact GELU differs by ~1e-3
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


ATTENTION = {"standard": CausalSelfAttention}


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CoPEAttention(config) if config.pos == "cope" else ATTENTION[config.attn](config)
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
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
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
        """AdamW; matrices (dim >= 2) decay, biases and norm gains do not. Fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
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
