"""
Fused log-prob ops for post-training, one Python API over two paths: the CUDA kernels of
kernels.cu (the extension `kernels_cuda`, used when it is built and the logits are on a GPU) and
a pure-torch twin with the same signature (CPU, or a GPU without the extension).

    lp = token_logprobs(logits, targets)                                  # (N,) log p(target)
    lp, H = token_logprobs(logits, targets, temperature=0.7, return_entropy=True)
    lp = hidden_logprobs(model.hidden(idx), model.lm_head.weight, targets)  # no (N, V) logits kept
    tokens, lp = sample_tokens(logits[:, -1], temperature=0.7, generator=g)
    naive_token_logprobs(logits, targets)                                 # slow reference twin

Why: a policy-gradient step needs log pi(y_t | y_<t) for every token, often with the entropy.
The obvious `log_softmax(logits.float(), -1).gather(...)` makes an (N, V) fp32 copy, keeps it
for the backward, and the backward makes two more: at N = 16k tokens, V = 50k that is 3.3 GB
each. Here the forward keeps one number per row (the logsumexp) and the backward recomputes the
softmax from it, chunk by chunk of rows, so the only (N, V) tensors are the logits and their
gradient (and with inplace_backward, not even the gradient). hidden_logprobs goes one step
further and never keeps the logits either (Cut Cross-Entropy, arXiv 2411.09009).

Conventions: targets < 0 (e.g. -100) mark ignored rows (log-prob 0, entropy 0, zero gradient);
outputs are fp32 for fp32/bf16/fp16 input and fp64 for fp64 input (so gradcheck works); the
kernel path computes in fp32 and is skipped for fp64. Out-of-range targets are checked on the
torch path only: checking on the GPU would cost a host sync per call.
"""
import torch
from torch.autograd.function import once_differentiable

try:
    import kernels_cuda as _C
except ImportError:
    _C = None

HAVE_CUDA_KERNELS = _C is not None


def _use_kernel(x):
    # fp64 stays on the torch path: the kernel accumulates in fp32
    return _C is not None and x.is_cuda and x.dtype != torch.float64


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty(x):
    return torch.empty(0, device=x.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Row math, torch path. x is one chunk of rows (n, V) of raw logits in any float dtype.

def _scale_into(buf, x, temperature):
    """buf = z = x * (1 / T) in buf's dtype (fp32/fp64), as the kernel computes it (upcast x, times
    1/T). The backward's log p = z - lse must round z exactly as the forward did: at |z| ~ 1e4 one
    fp32 ulp is 1e-3, and a row with p = 1 would otherwise come back as p = exp(+-1e-3)."""
    if temperature == 1.0 or x.dtype != buf.dtype:
        if buf is not x:
            buf.copy_(x)
        if temperature != 1.0:
            buf.mul_(1.0 / temperature)
    else:
        torch.mul(x, 1.0 / temperature, out=buf)
    return buf


def _rows_forward_torch(x, targets, temperature, with_entropy):
    """log-prob of the target, entropy (or None), and logsumexp of each row of z = x / T."""
    cdt = _compute_dtype(x)
    if temperature == 1.0 and x.dtype == cdt:
        z = x  # no copy at all
    else:  # (n, V): the only full-width copy of this chunk
        z = _scale_into(torch.empty(x.shape, device=x.device, dtype=cdt), x, temperature)
    lse = torch.logsumexp(z, dim=-1)
    ignored = targets < 0
    lp = (z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) - lse).masked_fill_(ignored, 0.0)
    ent = None
    if with_entropy:
        # H = lse - sum p z (the kernel's form) = -sum p log p; the latter subtracts before it
        # sums, so logits near 1e4 do not cancel two numbers of size 1e4 in fp32
        logp = z - lse[:, None]
        p = logp.exp()
        # a -inf logit (a masked token) has p = 0: clamp makes 0 * log p = 0 instead of nan
        ent = -p.mul_(logp.clamp_(min=torch.finfo(logp.dtype).min)).sum(-1)
        ent.masked_fill_(ignored, 0.0)
    return lp, ent, lse


def _rows_backward_torch(g_lp, g_ent, x, targets, lse, ent, temperature, out):
    """Writes into out (n, V) the grad of sum(g_lp * logprob + g_ent * entropy) w.r.t. the raw
    logits x (out may be x itself). With p = softmax(x / T), log p = x / T - lse, H the entropy:
        d logprob_i / d x_j = (onehot(target_i)_j - p_ij) / T
        d H_i / d x_j       = -p_ij (log p_ij + H_i) / T
    Computed in fp32 (fp64), in place in one chunk-sized buffer: log p, then p, then the grad.
    """
    cdt = lse.dtype
    buf = out if out.dtype == cdt else torch.empty(out.shape, device=out.device, dtype=cdt)
    _scale_into(buf, x, temperature).sub_(lse[:, None])  # log p (x may alias buf)
    rows = torch.arange(len(targets), device=x.device)
    tgt = targets.clamp(min=0)
    if g_ent is None:
        buf.exp_()  # p
        if g_lp is None:
            buf.zero_()
        else:
            buf.mul_(g_lp.to(cdt)[:, None] / -temperature)
    else:
        p = buf.exp()
        # p = 0 where log p = -inf (a masked token): clamp makes its term 0 instead of nan
        buf.clamp_(min=torch.finfo(cdt).min).add_(ent.to(cdt)[:, None]).mul_(p)
        buf.mul_(g_ent.to(cdt)[:, None] / -temperature)
        if g_lp is not None:
            buf.addcmul_(p, g_lp.to(cdt)[:, None], value=-1.0 / temperature)
    if g_lp is not None:
        buf[rows, tgt] += g_lp.to(cdt) / temperature
    # rows that are ignored get exactly 0, even if their logits are inf / nan padding
    buf[targets < 0] = 0.0
    if buf is not out:
        out.copy_(buf)


# ----------------------------------------------------------------------------------------------
# token_logprobs: (N, V) logits -> log p(target), entropy

class _TokenLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, chunk_size, inplace):
        if _use_kernel(logits):
            logits = logits.contiguous()
            lp, ent, lse = _C.logprob_forward(logits, targets, float(temperature), with_entropy)
        else:
            N = logits.size(0)
            cdt = _compute_dtype(logits)
            lp = torch.empty(N, device=logits.device, dtype=cdt)
            lse = torch.empty(N, device=logits.device, dtype=cdt)
            ent = torch.empty(N if with_entropy else 0, device=logits.device, dtype=cdt)
            for s in range(0, N, chunk_size):  # one chunk's fp32 copy at a time
                e = min(s + chunk_size, N)
                lp[s:e], ent_c, lse[s:e] = _rows_forward_torch(logits[s:e], targets[s:e],
                                                               temperature, with_entropy)
                if with_entropy:
                    ent[s:e] = ent_c
        # saved: the logits (the caller holds them anyway), targets, and one or two numbers a row
        if with_entropy:
            ctx.save_for_backward(logits, targets, lse, ent)
        else:
            ctx.save_for_backward(logits, targets, lse)
            ctx.mark_non_differentiable(ent)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.chunk_size, ctx.inplace = chunk_size, inplace
        ctx.set_materialize_grads(False)  # an output nobody used gets None: skip its term
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, targets, lse, *rest = ctx.saved_tensors
        ent = rest[0] if ctx.with_entropy else None
        if not ctx.with_entropy:
            g_ent = None
        if g_lp is None and g_ent is None:
            return None, None, None, None, None, None
        if _use_kernel(logits):
            g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.contiguous()
            g_ent = _empty(logits) if g_ent is None else g_ent.contiguous()
            grad = _C.logprob_backward(g_lp, g_ent, logits.detach(), targets, lse,
                                       ent if ent is not None else _empty(logits),
                                       float(ctx.temperature), ctx.inplace)
            return grad, None, None, None, None, None
        if ctx.inplace:  # the logits buffer becomes the gradient (each chunk read, then written)
            grad = logits.detach()
        else:
            grad = torch.empty_like(logits)
        N, c = logits.size(0), ctx.chunk_size
        for s in range(0, N, c):
            e = min(s + c, N)
            _rows_backward_torch(None if g_lp is None else g_lp[s:e],
                                 None if g_ent is None else g_ent[s:e], logits[s:e], targets[s:e],
                                 lse[s:e], None if ent is None else ent[s:e], ctx.temperature,
                                 out=grad[s:e])
        return grad, None, None, None, None, None


def _check_targets(fn, targets, lead_shape, V, device):
    if targets.shape != lead_shape:
        raise ValueError(f"{fn}: targets must have shape {tuple(lead_shape)}, "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{fn}: targets must be an integer tensor, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{fn}: targets are on {targets.device} but the inputs are on {device}")
    if not targets.is_cuda and targets.numel() and int(targets.max()) >= V:
        raise ValueError(f"{fn}: target {int(targets.max())} is out of range for vocab size {V}")


def _check_temperature(fn, temperature):
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")


# Default chunks, in values of a (rows, V) block. hidden_logprobs takes bigger ones: each chunk
# is a (rows, D) x (D, V) matmul, which is slow when rows is small (measured on CPU at
# 2048 x 50304: 83 rows 1.48x the naive time, 512 rows 1.23x).
CHUNK_ELEMENTS = 1 << 22         # token_logprobs: 4M values, 16 MB in fp32
HIDDEN_CHUNK_ELEMENTS = 1 << 24  # hidden_logprobs: 16M values, 64 MB in fp32


def _default_chunk(chunk_size, V, elements=CHUNK_ELEMENTS):
    return chunk_size if chunk_size is not None else max(1, elements // V)


def token_logprobs(logits, targets, temperature=1.0, return_entropy=False, chunk_size=None,
                   inplace_backward=False):
    """log p(target) under softmax(logits / T), and optionally the entropy of that softmax.

    logits (N, V) or (B, T, V), any float dtype; targets (N,) or (B, T) integer, < 0 = ignored.
    Returns logprobs fp32 of targets' shape, or (logprobs, entropy). With z = logits / T:
        lse      = log sum_j exp(z_j)
        logprob  = z[target] - lse
        entropy  = lse - sum_j softmax(z)_j z_j   (computed as -sum p log p, see below)
    Gradients (see _rows_backward_torch), p = softmax(z), H = entropy:
        d logprob / d logits = (onehot(target) - p) / T
        d entropy / d logits = -p (log p + H) / T
    Only logits, targets and lse (and entropy) are saved. The torch path upcasts chunk_size rows
    (default: CHUNK_ELEMENTS // V) at a time, in the forward and in the backward; the kernel path (CUDA, kernels_cuda built)
    reads each row once per pass and needs no chunks. inplace_backward=True writes the gradient
    into the logits buffer and hands that buffer to autograd: the logits are DESTROYED by the
    backward (fine when they are a throwaway output of lm_head; wrong if anything else reads
    them afterwards, and autograd raises if a node that saved them runs later). For a view that
    reshape had to copy, the copy is overwritten, not the caller's tensor.
    """
    fn = "token_logprobs"
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() not in (2, 3):
        raise ValueError(f"{fn}: logits must be a float tensor (N, V) or (B, T, V), "
                         f"got {getattr(logits, 'shape', type(logits))}")
    _check_targets(fn, targets, logits.shape[:-1], logits.size(-1), logits.device)
    _check_temperature(fn, temperature)
    chunk_size = _default_chunk(chunk_size, logits.size(-1))
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    lead = targets.shape
    x = logits.reshape(-1, logits.size(-1))
    t = targets.reshape(-1).long().contiguous()
    lp, ent = _TokenLogprobs.apply(x, t, float(temperature), bool(return_entropy), int(chunk_size),
                                   bool(inplace_backward))
    if return_entropy:
        return lp.view(lead), ent.view(lead)
    return lp.view(lead)


# ----------------------------------------------------------------------------------------------
# hidden_logprobs: hidden states and the unembedding -> log p(target), without (N, V) logits

class _HiddenLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, chunk_size):
        N = hidden.size(0)
        cdt = _compute_dtype(hidden)
        lp = torch.empty(N, device=hidden.device, dtype=cdt)
        lse = torch.empty(N, device=hidden.device, dtype=cdt)
        ent = torch.empty(N if with_entropy else 0, device=hidden.device, dtype=cdt)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            x = hidden[s:e] @ weight.t()  # (c, V) in the input dtype; the row math upcasts it
            if _use_kernel(x):
                lp_c, ent_c, lse_c = _C.logprob_forward(x, targets[s:e], float(temperature),
                                                        with_entropy)
            else:
                lp_c, ent_c, lse_c = _rows_forward_torch(x, targets[s:e], temperature, with_entropy)
            lp[s:e], lse[s:e] = lp_c, lse_c
            if with_entropy:
                ent[s:e] = ent_c
        if with_entropy:
            ctx.save_for_backward(hidden, weight, targets, lse, ent)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
            ctx.mark_non_differentiable(ent)
        ctx.temperature, ctx.with_entropy, ctx.chunk_size = temperature, with_entropy, chunk_size
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, *rest = ctx.saved_tensors
        ent = rest[0] if ctx.with_entropy else None
        if not ctx.with_entropy:
            g_ent = None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None
        dt = hidden.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # grad_weight sums over all N rows: accumulate in fp32 (fp64), cast once at the end
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype)
        N, c = hidden.size(0), ctx.chunk_size
        for s in range(0, N, c):
            e = min(s + c, N)
            h = hidden[s:e]
            x = h @ weight.t()  # recompute this chunk's logits (c, V): cheaper than keeping them
            if _use_kernel(x):
                gl = torch.zeros_like(lse[s:e]) if g_lp is None else g_lp[s:e].contiguous()
                ge = _empty(x) if g_ent is None else g_ent[s:e].contiguous()
                g = _C.logprob_backward(gl, ge, x, targets[s:e], lse[s:e],
                                        _empty(x) if ent is None else ent[s:e],
                                        float(ctx.temperature), True)  # written over x, dtype dt
            else:  # the recomputed logits are throwaway: the grad overwrites them
                _rows_backward_torch(None if g_lp is None else g_lp[s:e],
                                     None if g_ent is None else g_ent[s:e], x, targets[s:e],
                                     lse[s:e], None if ent is None else ent[s:e], ctx.temperature,
                                     out=x)
                g = x
            if need_h:
                grad_h[s:e] = g @ weight
            if need_w:
                if dt == grad_w.dtype:
                    grad_w.addmm_(g.t(), h)
                else:  # bf16/fp16 matmul, fp32 sum across chunks
                    grad_w += g.t() @ h
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def hidden_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                    chunk_size=None):
    """token_logprobs(hidden @ weight.T, targets, ...) without ever holding the (N, V) logits.

    hidden (N, D) or (B, T, D); weight (V, D), the unembedding (lm_head.weight, no bias);
    targets (N,) or (B, T), < 0 = ignored. Returns logprobs fp32, or (logprobs, entropy).
    Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009): the forward computes the logits of
    chunk_size rows at a time, keeps only their logsumexp, and the backward recomputes them, forms
    that chunk's grad_logits G (c, V) and contracts it straight away:
        grad_hidden[chunk] = G @ W          grad_weight += G^T @ hidden[chunk]
    Saved: hidden, weight, targets, lse (and entropy). Memory is one chunk's logits instead of N
    rows of them; the price is one extra (N, D) x (D, V) matmul in the backward. Gradients flow
    to both hidden and weight; a weight tied to the embedding gets both contributions summed by
    autograd as usual.
    """
    fn = "hidden_logprobs"
    if not torch.is_tensor(hidden) or not hidden.is_floating_point() or hidden.dim() not in (2, 3):
        raise ValueError(f"{fn}: hidden must be a float tensor (N, D) or (B, T, D), "
                         f"got {getattr(hidden, 'shape', type(hidden))}")
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"{fn}: weight must be (V, D) with D = {hidden.size(-1)}, "
                         f"got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{fn}: hidden ({hidden.dtype}, {hidden.device}) and weight "
                         f"({weight.dtype}, {weight.device}) must share dtype and device")
    _check_targets(fn, targets, hidden.shape[:-1], weight.size(0), hidden.device)
    _check_temperature(fn, temperature)
    chunk_size = _default_chunk(chunk_size, weight.size(0), HIDDEN_CHUNK_ELEMENTS)
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.size(-1))
    t = targets.reshape(-1).long().contiguous()
    lp, ent = _HiddenLogprobs.apply(h, weight, t, float(temperature), bool(return_entropy),
                                    int(chunk_size))
    if return_entropy:
        return lp.view(lead), ent.view(lead)
    return lp.view(lead)


# ----------------------------------------------------------------------------------------------
# sampling

def sample_tokens(logits, temperature=1.0, generator=None, split=None):
    """One token per row from softmax(logits / T), and its log-prob under that softmax.

    logits (B, V) any float dtype -> (tokens int64 (B,), logprobs fp32 (B,)).
    Gumbel-max: argmax_j (z_j + G_j) with G_j = -log(-log U_j), U_j ~ Uniform(0, 1) i.i.d., is
    distributed as softmax(z) (Gumbel 1954; Maddison et al., arXiv 1411.0030 sec. 2), so one pass
    over the row samples without forming probabilities or a cumulative sum. temperature 0 is
    greedy: argmax, log-prob 0 (the greedy policy is deterministic). The torch path draws U from
    `generator` (on the generator's device); the kernel path draws one seed from it instead and
    hashes it with each element's index in the kernel (splitmix64), so the two paths give different tokens for the same generator.
    split = (first, total): these rows are rows first.. of a total-row batch split across
    processes; both paths then give each row the noise it has in the whole batch (the torch path
    draws U for all total rows and slices; the kernel offsets its element index).
    """
    fn = "sample_tokens"
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be a float tensor (B, V), "
                         f"got {getattr(logits, 'shape', type(logits))}")
    if temperature < 0:
        raise ValueError(f"{fn}: temperature must be >= 0, got {temperature}")
    first, total = split or (0, logits.size(0))
    if not 0 <= first <= total - logits.size(0):
        raise ValueError(f"{fn}: split (first, total) = {split} do not hold {logits.size(0)} rows")
    cdt = _compute_dtype(logits)
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.zeros(tokens.shape, device=logits.device, dtype=cdt)
    if _use_kernel(logits):
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(2**62, (1,), generator=generator, device=gen_device))
        tokens, lp = _C.sample(logits.contiguous(), float(temperature), seed, first * logits.size(1))
        return tokens, lp
    z = logits.to(cdt) / temperature
    gen_device = generator.device if generator is not None else z.device
    u = torch.rand(total, z.size(1), generator=generator, device=gen_device, dtype=cdt)
    u = u[first:first + z.size(0)].to(z.device)
    u.clamp_(min=torch.finfo(cdt).tiny)  # rand can return exactly 0; -log(-log 0) is -inf
    tokens = (z - torch.log(-torch.log(u))).argmax(-1)
    lp = z.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(z, -1)
    return tokens, lp


# ----------------------------------------------------------------------------------------------
# the slow, obvious reference

def naive_token_logprobs(logits, targets, temperature=1.0, return_entropy=False):
    """Full log_softmax in fp32 (fp64 for fp64 input), then gather: the reference for tests and
    the baseline for bench/logprob.py. Same conventions as token_logprobs."""
    x = logits.to(_compute_dtype(logits)) / temperature
    logp = torch.log_softmax(x, dim=-1)  # (..., V)
    ignored = targets < 0
    lp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return lp
    p = logp.exp()
    ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1).masked_fill(ignored, 0.0)
    return lp, ent
