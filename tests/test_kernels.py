import pytest
import torch
from torch.nn import functional as F

import kernels
from kernels import hidden_logprobs, naive_token_logprobs, sample_tokens, token_logprobs
from model import GPT, GPTConfig


def make(N=37, V=53, scale=3.0, dtype=torch.float32, seed=0, ignore=(1, 5, 36)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignore)] = -100
    return x, t


def ref64(x, t, T=1.0):
    """Independent float64 reference: log_softmax(x / T) gathered; entropy -sum p log p."""
    logp = F.log_softmax(x.double() / T, -1)
    keep = t >= 0
    lp = torch.zeros(x.shape[:-1], dtype=torch.float64)
    lp[keep] = logp[keep].gather(-1, t[keep][:, None]).squeeze(-1)
    p = logp.exp()
    ent = -(p * logp).sum(-1) * keep
    return lp, ent


def grads_of(fn, x, *args, **kw):
    """Values and d/dx of a fixed random combination of the outputs (so every output matters)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
               for o in out)
    loss.backward()
    return [o.detach() for o in out], x.grad


@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_matches_float64_reference(entropy):
    x, t = make()
    T = 0.7
    # chunk_size 8 over N = 37 rows: four full chunks and a ragged one of 5
    out, gx = grads_of(token_logprobs, x, t, temperature=T, return_entropy=entropy, chunk_size=8)
    ref_out, ref_gx = grads_of(lambda x_, t_: ref64(x_, t_, T)[: 1 + entropy], x.double(), t)
    assert all(o.dtype == torch.float32 for o in out) and gx.dtype == torch.float32
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(gx.double(), ref_gx, atol=2e-6, rtol=1e-4)
    assert (out[0][t < 0] == 0).all() and (gx[t < 0] == 0).all()
    if entropy:
        assert (out[1][t < 0] == 0).all()


def test_entropy_equals_independent_float64():
    x, t = make(scale=1.5)
    _, ent = token_logprobs(x, t, temperature=1.3, return_entropy=True, chunk_size=10)
    p = torch.softmax(x.double() / 1.3, -1)
    by_hand = -(p * p.log()).sum(-1)
    keep = t >= 0
    torch.testing.assert_close(ent[keep].double(), by_hand[keep], atol=1e-5, rtol=1e-5)
    # and the naive twin agrees
    _, ent_naive = naive_token_logprobs(x.double(), t, 1.3, return_entropy=True)
    torch.testing.assert_close(ent_naive[keep], by_hand[keep])


def test_gradcheck_token_logprobs():
    x, t = make(N=6, V=7, scale=1.0, dtype=torch.float64, ignore=(2,))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_: token_logprobs(x_, t, 0.7, chunk_size=4), (x,))
    # both outputs at once: gradcheck builds the Jacobian of each
    assert torch.autograd.gradcheck(
        lambda x_: token_logprobs(x_, t, 0.7, return_entropy=True, chunk_size=4), (x,))
    # the entropy alone (the log-prob output unused, so its grad arrives as None)
    assert torch.autograd.gradcheck(
        lambda x_: token_logprobs(x_, t, 0.7, return_entropy=True, chunk_size=4)[1], (x,))


def test_gradcheck_hidden_logprobs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 6, -100, 3, 3, 1])
    assert torch.autograd.gradcheck(
        lambda h_, W_: hidden_logprobs(h_, W_, t, 0.7, return_entropy=True, chunk_size=4), (h, W))
    assert torch.autograd.gradcheck(lambda h_, W_: hidden_logprobs(h_, W_, t, chunk_size=4), (h, W))


def test_extreme_logits_finite_and_exact():
    x, t = make(N=70, V=40, scale=1.0, ignore=(4,))
    x[0] *= 1e4                       # logits around +-1e4
    x[1] = x[1] * 1e4 - 1e4           # all very negative
    x[2, :] = 0.0
    x[2, 17] = 1e4                    # one huge value: p = 1 there, 0 elsewhere
    t[2] = 17
    x[3, :] = 0.0
    x[3, 5] = 1e4
    t[3] = 6                          # target has log-prob -1e4 / T
    x[4] = float("nan")               # an ignored padding row may hold garbage
    # rows with one huge value of varied size: the backward's p = exp(z - lse) must round z as
    # the forward did, or p = 1 comes back as exp(+-1 ulp of 1e4) ~ 1 +- 1e-3
    rows = torch.arange(5, 70)
    x[rows, t[rows]] = torch.linspace(5e3, 2e4, len(rows))
    out, gx = grads_of(token_logprobs, x, t, temperature=0.7, return_entropy=True, chunk_size=4)
    keep = t >= 0
    clean = x.double().masked_fill(~keep[:, None], 0.0)  # the reference would turn nan into nan
    ref_out, ref_gx = grads_of(lambda x_, t_: ref64(x_, t_, 0.7), clean, t)
    for o, r in zip(out, ref_out):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, atol=1e-3, rtol=1e-6)
    assert torch.isfinite(gx).all() and (gx[~keep] == 0).all()
    torch.testing.assert_close(gx.double(), ref_gx, atol=1e-5, rtol=1e-4)


def test_masked_vocab_minus_inf_logits():
    # -inf marks tokens a policy may not emit (e.g. outside top-k); they have p = 0 and must not
    # turn the entropy or its gradient into nan (0 * -inf)
    x, t = make(N=9, V=30, ignore=(2,))
    x[:, 20:] = float("-inf")
    t[t >= 20] = 3
    out, gx = grads_of(token_logprobs, x, t, temperature=0.7, return_entropy=True, chunk_size=4)
    ref_out, ref_gx = grads_of(lambda x_, t_: ref64(x_, t_, 0.7), x[:, :20].double(), t)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o.double(), r, atol=2e-5, rtol=1e-5)
    assert (gx[:, 20:] == 0).all()
    torch.testing.assert_close(gx[:, :20].double(), ref_gx, atol=2e-6, rtol=1e-4)
    _, ent_naive = naive_token_logprobs(x, t, 0.7, return_entropy=True)
    torch.testing.assert_close(ent_naive.double(), ref_out[1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    x, t = make(N=40, V=300, dtype=dtype)
    out, gx = grads_of(token_logprobs, x, t, temperature=0.7, return_entropy=True, chunk_size=16)
    # reference on the same rounded inputs, so only our arithmetic is compared
    ref_out, ref_gx = grads_of(lambda x_, t_: ref64(x_, t_, 0.7), x.double(), t)
    assert all(o.dtype == torch.float32 for o in out) and gx.dtype == dtype
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o.double(), r, atol=1e-4, rtol=1e-5)
    eps = torch.finfo(dtype).eps  # the gradient itself is rounded to the input dtype
    torch.testing.assert_close(gx.double(), ref_gx, atol=1e-6, rtol=eps)


@pytest.mark.parametrize("entropy", [False, True])
def test_inplace_backward(entropy):
    x, t = make()
    out, ref = grads_of(token_logprobs, x, t, temperature=0.7, return_entropy=entropy, chunk_size=8)
    buf = x.clone().requires_grad_(True)
    out2 = token_logprobs(buf, t, 0.7, return_entropy=entropy, chunk_size=8, inplace_backward=True)
    out2 = out2 if isinstance(out2, tuple) else (out2,)
    g = torch.Generator().manual_seed(1)
    sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
        for o in out2).backward()
    torch.testing.assert_close(buf.grad, ref, atol=0, rtol=0)
    torch.testing.assert_close(buf.detach(), ref, atol=0, rtol=0)  # the logits are gone


def test_3d_inputs_reshape():
    x, t = make(N=12, ignore=(3,))
    lp3, ent3 = token_logprobs(x.view(3, 4, -1), t.view(3, 4), return_entropy=True, chunk_size=5)
    lp, ent = token_logprobs(x, t, return_entropy=True)
    assert lp3.shape == ent3.shape == (3, 4)
    torch.testing.assert_close(lp3.view(-1), lp)
    torch.testing.assert_close(ent3.view(-1), ent)


def test_bad_inputs_raise_clear_errors():
    x, t = make()
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs(x, t[:-1])
    with pytest.raises(ValueError, match="out of range"):
        token_logprobs(x, t.clamp(min=0) + 60)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(x, t, temperature=0)
    with pytest.raises(ValueError, match="weight must be"):
        hidden_logprobs(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))


class SavedTensors:
    """Records what autograd saves for the backward, via saved_tensors_hooks."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def pack(self, t):
        self.saved.append(t)
        return t

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def test_forward_saves_no_full_fp32_copy():
    N, V = 4096, 8192
    x = torch.randn(N, V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    for entropy in (False, True):
        with SavedTensors() as rec:
            token_logprobs(x, t, return_entropy=entropy, chunk_size=256)
        shapes = [tuple(s.shape) for s in rec.saved]
        assert shapes == [(N, V), (N,), (N,)] + [(N,)] * entropy, shapes
        assert rec.saved[0].data_ptr() == x.data_ptr()  # the caller's logits, not a copy
        assert sum(s.numel() for s in rec.saved[1:]) <= 3 * N
    # the naive twin, by contrast, keeps an (N, V) fp32 log_softmax alive for its backward
    with SavedTensors() as rec:
        naive_token_logprobs(x[:64], t[:64])
    assert any(tuple(s.shape) == (64, V) and s.data_ptr() != x.data_ptr() for s in rec.saved)


def test_hidden_logprobs_saves_no_logits():
    h = torch.randn(300, 16, requires_grad=True)
    W = torch.randn(500, 16, requires_grad=True)
    t = torch.randint(0, 500, (300,))
    with SavedTensors() as rec:
        hidden_logprobs(h, W, t, return_entropy=True, chunk_size=64)
    assert [tuple(s.shape) for s in rec.saved] == [(300, 16), (500, 16), (300,), (300,), (300,)]


@pytest.mark.parametrize("entropy", [False, True])
def test_hidden_logprobs_matches_token_logprobs(entropy):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(45, 24, generator=g)
    W = torch.randn(70, 24, generator=g) * 0.5
    t = torch.randint(0, 70, (45,), generator=g)
    t[[0, 20]] = -100

    def run(fn):
        h_, W_ = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        out = fn(h_, W_)
        out = out if isinstance(out, tuple) else (out,)
        gg = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gg)).sum() for o in out).backward()
        return out, h_.grad, W_.grad

    fused = run(lambda h_, W_: hidden_logprobs(h_, W_, t, 0.7, entropy, chunk_size=16))
    plain = run(lambda h_, W_: token_logprobs(h_ @ W_.t(), t, 0.7, entropy))
    for a, b in zip(fused[0], plain[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1], plain[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[2], plain[2], atol=1e-5, rtol=1e-5)


def test_hidden_logprobs_on_a_real_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 61, (3, 12))
    targets = idx[:, 1:].clone()
    targets[1, :4] = -100  # e.g. a prompt

    lp = hidden_logprobs(model.hidden(idx)[:, :-1], model.lm_head.weight, targets, chunk_size=7)
    lp.sum().backward()
    g_fused = model.lm_head.weight.grad.clone()  # tied: unembedding and embedding grads summed
    model.zero_grad()

    logits = model(idx)[0][:, :-1]
    ref = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = ref * (targets >= 0)
    ref.sum().backward()
    assert lp.shape == (3, 11)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fused, model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# sampling

PEAKED = torch.linspace(0.0, 3.5, 20)  # at T = 0.7 the rarest token has p ~ 1.6e-3 (31 expected)
CHI2_DF19_ALPHA_1E3 = 43.82            # 0.999 quantile of chi-square, df = 20 cells - 1 = 19


def chi2_stat(tokens, probs):
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return ((counts - expected) ** 2 / expected).sum().item()


def test_sample_tokens_fits_softmax_at_temperature():
    g = torch.Generator().manual_seed(1234)
    logits = PEAKED.expand(20_000, -1)
    tokens, lp = sample_tokens(logits, temperature=0.7, generator=g)
    assert tokens.dtype == torch.int64 and lp.dtype == torch.float32
    assert chi2_stat(tokens, torch.softmax(PEAKED.double() / 0.7, -1)) < CHI2_DF19_ALPHA_1E3
    # power: the same draws are clearly not from the T = 1 distribution
    assert chi2_stat(tokens, torch.softmax(PEAKED.double(), -1)) > CHI2_DF19_ALPHA_1E3
    torch.testing.assert_close(lp, torch.log_softmax(PEAKED / 0.7, -1)[tokens])


def test_sample_tokens_seeded_and_greedy():
    logits = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    a = sample_tokens(logits, 1.0, torch.Generator().manual_seed(7))
    b = sample_tokens(logits, 1.0, torch.Generator().manual_seed(7))
    c = sample_tokens(logits, 1.0, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    tok, lp = sample_tokens(logits, 0.0)
    assert torch.equal(tok, logits.argmax(-1)) and (lp == 0).all()


def test_sample_tokens_split_rows_draw_what_the_whole_batch_does():
    logits = torch.randn(10, 33, generator=torch.Generator().manual_seed(0))
    whole = sample_tokens(logits, 0.9, torch.Generator().manual_seed(7))
    parts = [sample_tokens(logits[a:b], 0.9, torch.Generator().manual_seed(7), split=(a, 10))
             for a, b in ((0, 3), (3, 10))]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert not torch.equal(sample_tokens(logits[3:], 0.9, torch.Generator().manual_seed(7))[0], whole[0][3:])
    with pytest.raises(ValueError, match="split"):
        sample_tokens(logits[3:], 0.9, split=(4, 10))


# ----------------------------------------------------------------------------------------------
# the CUDA kernels against the torch twin (runs on a GPU box with kernels_cuda built)

needs_kernels = pytest.mark.skipif(not (kernels.HAVE_CUDA_KERNELS and torch.cuda.is_available()),
                                   reason="needs a GPU and the kernels_cuda extension")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entropy", [False, True])
def test_cuda_kernel_matches_torch_path(dtype, entropy, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 5003, generator=g) * 4).to(dtype).cuda()
    t = torch.randint(0, 5000, (300,), generator=g).cuda()
    t[::7] = -100
    x[:, -3:] = float("-inf")  # a masked tail of the vocabulary

    def run(inplace):
        x_ = x.clone().requires_grad_(True)
        out = token_logprobs(x_, t, 0.7, entropy, chunk_size=64, inplace_backward=inplace)
        out = out if isinstance(out, tuple) else (out,)
        gg = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gg).cuda()).sum() for o in out).backward()
        return out, x_.grad.float()

    fast, fast_inplace = run(False), run(True)
    with monkeypatch.context() as m:
        m.setattr(kernels, "_C", None)
        slow = run(False)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=1.6e-2)
    for a, b in zip(fast[0], slow[0]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast[1], slow[1], **tol)
    torch.testing.assert_close(fast_inplace[1], fast[1])


@needs_kernels
def test_cuda_hidden_logprobs_and_sampling():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 64, generator=g).cuda().requires_grad_(True)
    W = (torch.randn(3000, 64, generator=g) * 0.3).cuda().requires_grad_(True)
    t = torch.randint(0, 3000, (200,), generator=g).cuda()
    lp = hidden_logprobs(h, W, t, 0.7, chunk_size=64)
    ref = naive_token_logprobs(h @ W.t(), t, 0.7)
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)
    gh, gW = torch.autograd.grad(lp.sum(), (h, W))
    rh, rW = torch.autograd.grad(ref.sum(), (h, W))
    torch.testing.assert_close(gh, rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gW, rW, atol=1e-4, rtol=1e-4)

    tokens, lp = sample_tokens(PEAKED.cuda().expand(20_000, -1).contiguous(), 0.7,
                               torch.Generator().manual_seed(3))
    assert chi2_stat(tokens.cpu(), torch.softmax(PEAKED.double() / 0.7, -1)) < CHI2_DF19_ALPHA_1E3
    assert chi2_stat(tokens.cpu(), torch.softmax(PEAKED.double(), -1)) > CHI2_DF19_ALPHA_1E3
    ref = torch.log_softmax(PEAKED / 0.7, -1)[tokens.cpu()]
    torch.testing.assert_close(lp.cpu(), ref, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_cuda_sampling_kernel_split_rows_draw_what_the_whole_batch_does():
    logits = torch.randn(10, 3001, generator=torch.Generator().manual_seed(0)).cuda()
    whole = sample_tokens(logits, 0.9, torch.Generator().manual_seed(7))
    parts = [sample_tokens(logits[a:b], 0.9, torch.Generator().manual_seed(7), split=(a, 10))
             for a, b in ((0, 3), (3, 10))]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert not torch.equal(sample_tokens(logits[3:], 0.9, torch.Generator().manual_seed(7))[0], whole[0][3:])
