import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig
from sampler import KVCache, filter_logits, generate, sample_next

V = 29


def tiny(pos="learned", std=None, block_size=40):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=16, pos=pos))
    if std is not None:  # peaked logits, so that temperature / top-k / top-p have visible effects
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0, std)
    return m.eval()


RAGGED = [[3, 7, 1, 4, 4, 9], [5], [8, 2, 6], [1, 1, 2, 3, 5, 8, 13, 21, 4]]


def full_logprobs(model, prompts, out, temperature):
    """Reference: for each row, one full forward over prompt + completion, log_softmax(logits/T)
    at the position before each generated token."""
    rows, device = [], next(model.parameters()).device
    for p, comp in zip(prompts, out.completions()):
        with torch.no_grad():
            logits = model(torch.tensor([p + comp], device=device))[0][0, len(p) - 1:len(p) - 1 + len(comp)]
        lp = F.log_softmax(logits.float() / temperature, -1)
        rows.append(lp.cpu().gather(-1, torch.tensor(comp)[:, None])[:, 0])
    return rows


@pytest.mark.parametrize("pos", ["learned", "rope", "none"])
def test_greedy_cache_equals_no_cache_on_ragged_batch(pos):
    m = tiny(pos, std=0.3)
    a = generate(m, RAGGED, 20, temperature=0)
    b = generate(m, RAGGED, 20, temperature=0, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    # and each row equals generating that row alone (padding of the others cannot leak in)
    for i, p in enumerate(RAGGED):
        assert torch.equal(generate(m, [p], 20, temperature=0).tokens[0], a.tokens[i])


@pytest.mark.parametrize("pos", ["learned", "rope", "none"])
def test_cached_logprobs_match_full_forward(pos):
    m = tiny(pos, std=0.3)
    T = 0.7
    out = generate(m, RAGGED, 15, temperature=T, seed=3, stop_tokens=[0, 1])
    for i, ref in enumerate(full_logprobs(m, RAGGED, out, T)):
        n = int(out.lengths[i])
        assert torch.allclose(out.logprobs[i, :n], ref, atol=1e-4), i
        assert torch.all(out.logprobs[i, n:] == 0)


def test_num_samples_shares_the_prefill_and_equals_repeated_prompts():
    """num_samples = 3 prefills each ragged prompt once and copies its cache rows; the draw
    equals that of the prompts written out 3 times, with and without the cache."""
    m = tiny("learned", std=0.3)
    a = generate(m, RAGGED, 12, temperature=1.0, seed=5, stop_tokens=[0, 1], num_samples=3)
    repeated = [p for p in RAGGED for _ in range(3)]
    b = generate(m, repeated, 12, temperature=1.0, seed=5, stop_tokens=[0, 1])
    c = generate(m, RAGGED, 12, temperature=1.0, seed=5, stop_tokens=[0, 1], num_samples=3,
                 use_cache=False)
    assert a.tokens.shape == (12, 12)
    for other in (b, c):
        assert torch.equal(a.tokens, other.tokens) and torch.equal(a.lengths, other.lengths)
        assert torch.allclose(a.logprobs, other.logprobs, atol=1e-5)
    assert not torch.equal(a.tokens[0], a.tokens[1])  # the 3 samples of a prompt differ
    for i, ref in enumerate(full_logprobs(m, repeated, a, 1.0)):
        assert torch.allclose(a.logprobs[i, :int(a.lengths[i])], ref, atol=1e-4)
    with pytest.raises(ValueError, match="num_samples"):
        generate(m, RAGGED, 4, num_samples=0)


def test_stop_tokens_lengths_and_padding():
    m = tiny(std=0.3)
    out = generate(m, RAGGED * 8, 25, temperature=1.5, seed=0, stop_tokens=[2, 3], pad_id=28)
    stopped = 0
    for row, n in zip(out.tokens, out.lengths):
        n = int(n)
        body = row[:n].tolist()
        assert not any(t in (2, 3) for t in body[:-1])  # no stop token before the end
        if body[-1] in (2, 3):
            stopped += 1
        else:
            assert n == 25
        assert torch.all(row[n:] == 28)
    assert stopped > 0  # the test exercised stopping
    assert torch.equal(out.mask().sum(1).long(), out.lengths)


def test_same_seed_same_output_and_different_seed_differs():
    m = tiny(std=0.3)
    a = generate(m, RAGGED, 12, seed=7)
    b = generate(m, RAGGED, 12, seed=7)
    c = generate(m, RAGGED, 12, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)


def test_sample_next_is_torch_multinomial_bit_for_bit():
    """The exponential race sample_next writes out is what torch.multinomial(p, 1) computes: the
    same tokens for the same generator state (so a split batch samples what multinomial would)."""
    logits = torch.randn(64, 29, generator=torch.Generator().manual_seed(0)) * 3
    for kw in (dict(temperature=0.8), dict(temperature=1.0, top_k=5), dict(temperature=1.3, top_p=0.7)):
        tok, lp = sample_next(logits, generator=torch.Generator().manual_seed(3), **kw)
        p = F.log_softmax(filter_logits(logits, kw["temperature"], kw.get("top_k"), kw.get("top_p")), -1).exp()
        ref = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(3))[:, 0]
        assert torch.equal(tok, ref)
        assert torch.allclose(lp, p.log().gather(-1, tok[:, None])[:, 0], atol=1e-6)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_split_batch_samples_what_the_whole_batch_does(use_cache):
    """Rows 0..5 and 6..11 of a 12-row batch (4 ragged prompts x 3 samples), each generated with
    split = (first row, 12) and the same seed, equal the rows of one call over the whole batch;
    without split the second half would draw the first half's noise."""
    m = tiny("learned", std=0.3)
    kw = dict(temperature=1.0, seed=5, stop_tokens=[0, 1], num_samples=3, use_cache=use_cache)
    whole = generate(m, RAGGED, 12, **kw)
    halves = [generate(m, RAGGED[:2], 12, split=(0, 12), **kw), generate(m, RAGGED[2:], 12, split=(6, 12), **kw)]
    assert torch.equal(torch.cat([h.tokens for h in halves]), whole.tokens)
    assert torch.equal(torch.cat([h.lengths for h in halves]), whole.lengths)
    assert torch.allclose(torch.cat([h.logprobs for h in halves]), whole.logprobs, atol=1e-6)
    unsplit = generate(m, RAGGED[2:], 12, **kw)
    assert not torch.equal(unsplit.tokens, whole.tokens[6:])
    with pytest.raises(ValueError, match="split"):
        generate(m, RAGGED[2:], 12, split=(8, 12), **kw)


def chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_softmax_over_temperature():
    """Chi-square goodness of fit of 20000 first-token draws against softmax(logits / T).
    Critical value for df = V - 1 = 28 at alpha = 1e-3 is 56.89. The same draws must fail the
    fit against T = 1, so the test can tell temperatures apart."""
    m = tiny(std=0.25)
    prompt = [4, 2, 9]
    T, n = 0.6, 20000
    with torch.no_grad():
        logits = m(torch.tensor([prompt]))[0][0, -1]
    out = generate(m, [prompt] * n, 1, temperature=T, seed=11)
    counts = torch.bincount(out.tokens[:, 0], minlength=V).double()
    probs = F.softmax(logits.double() / T, -1)
    assert chi2(counts, probs) < 56.89
    assert chi2(counts, F.softmax(logits.double(), -1)) > 56.89
    # the reported log-probs are those of the distribution drawn from
    assert torch.allclose(out.logprobs[:, 0], probs.log().float()[out.tokens[:, 0]], atol=1e-5)


def kept_set_reference(logits, top_k, top_p):
    """Slow reference: the k most likely, then the smallest prefix (by probability) of those
    whose mass reaches p, walked one token at a time."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k is not None:
        order = order[:top_k]
    probs = F.softmax(logits[order].double(), -1).tolist()
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        kept.append(i)
        mass += p
        if top_p is not None and mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (5, 0.8), (1, None), (None, 0.05)])
def test_top_k_top_p_stay_in_kept_set(top_k, top_p):
    m = tiny(std=0.3)
    T = 0.9
    out = generate(m, RAGGED * 16, 6, temperature=T, top_k=top_k, top_p=top_p, seed=5)
    seen_sizes = set()
    for i, comp in enumerate(out.completions()):
        p = (RAGGED * 16)[i]
        with torch.no_grad():
            logits = m(torch.tensor([p + comp]))[0][0] / T
        for t, tok in enumerate(comp):
            kept = kept_set_reference(logits[len(p) - 1 + t], top_k, top_p)
            seen_sizes.add(len(kept))
            assert tok in kept, (i, t, tok, kept)
    assert max(seen_sizes) < V  # the filter really removed tokens


def test_filter_logits_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(50, V) * 3
    for top_k, top_p in [(4, None), (None, 0.7), (6, 0.6)]:
        kept = torch.isfinite(filter_logits(logits, 1.0, top_k, top_p))
        for r in range(50):
            assert set(kept[r].nonzero()[:, 0].tolist()) == kept_set_reference(logits[r], top_k, top_p)


def test_generate_restores_training_mode():
    m = tiny().train()
    generate(m, [[1, 2]], 3)
    assert m.training


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[1] * 41], max_new_tokens=1), "longer than block_size"),
    (dict(prompts=[[1] * 30, [2]], max_new_tokens=11), "beyond the cache"),
    (dict(prompts=[[1, 2], []], max_new_tokens=4), "prompt 1 is empty"),
    (dict(prompts=[], max_new_tokens=4), "non-empty list"),
    (dict(prompts=[[1, V]], max_new_tokens=4), "outside"),
    (dict(prompts=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1]], max_new_tokens=4, top_p=0.0), "top_p must be in"),
    (dict(prompts=[[1]], max_new_tokens=4, top_p=1.5), "top_p must be in"),
    (dict(prompts=[[1]], max_new_tokens=4, top_k=0), "top_k"),
    (dict(prompts=[[1]], max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(prompts=[[1]], max_new_tokens=4, stop_tokens=[V + 3]), "outside the vocabulary"),
])
def test_bad_input_raises_clear_error(kwargs, msg):
    m = tiny()
    with pytest.raises(ValueError, match=msg):
        generate(m, **kwargs)


def test_cache_larger_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        KVCache.for_model(tiny(), 2, 41)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_cached_logprobs_match_full_forward(dtype, atol):
    """On the GPU, in float32 and bf16: cached sampling log-probs agree with a full forward in
    the same dtype (bf16 rounds differently between the two paths, hence the wider tolerance)."""
    m = tiny("rope", std=0.3).cuda().to(dtype)
    out = generate(m, RAGGED, 15, temperature=0.8, seed=0, stop_tokens=[0])
    for i, ref in enumerate(full_logprobs(m, RAGGED, out, 0.8)):
        n = int(out.lengths[i])
        assert torch.allclose(out.logprobs[i, :n].cpu(), ref.cpu(), atol=atol), i
