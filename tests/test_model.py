import json
import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig
from sampler import KVCache


def tiny(pos="learned", **kw):
    cfg = dict(vocab_size=37, block_size=24, n_layer=2, n_head=2, n_embd=16, pos=pos)
    cfg.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**cfg))


def test_forward_shapes_and_loss_ignores_minus_100():
    m = tiny()
    idx = torch.randint(0, 37, (3, 10))
    targets = torch.randint(0, 37, (3, 10))
    targets[0, :4] = -100
    targets[2, 7:] = -100
    logits, loss = m(idx, targets)
    assert logits.shape == (3, 10, 37)
    keep = targets != -100
    by_hand = -F.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert m(idx)[1] is None


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="unknown field.*n_layers"):
        GPTConfig.from_dict(dict(n_layers=2))
    with pytest.raises(ValueError, match="pos must be one of"):
        GPTConfig(pos="alibi")
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="positive int"):
        GPTConfig(n_layer=0)


def test_sequence_longer_than_block_size_is_an_error():
    m = tiny()
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(torch.zeros(1, 25, dtype=torch.long))


@pytest.mark.parametrize("pos", ["learned", "rope", "none", "cope"])
def test_embeds_path_equals_token_path(pos):
    m = tiny(pos).eval()
    idx = torch.randint(0, 37, (2, 9))
    h_idx = m.hidden(idx)
    h_emb = m.hidden(embeds=m.transformer.wte(idx))
    assert h_idx.shape == (2, 9, 16)
    assert torch.equal(h_idx, h_emb)
    with pytest.raises(ValueError, match="exactly one"):
        m.hidden(idx, embeds=m.transformer.wte(idx))


@pytest.mark.parametrize("pos", ["learned", "rope", "none", "cope"])
def test_cached_chunks_equal_full_forward(pos):
    """Prefill a chunk, then feed the rest one token at a time (and a 2-token chunk, as Coconut
    will): hidden states equal the full causal forward."""
    m = tiny(pos).double().eval()
    if pos == "cope":  # its position table starts at zero: make positions matter
        for blk in m.transformer.h:
            torch.nn.init.normal_(blk.attn.pos_emb, std=1.0)
    idx = torch.randint(0, 37, (3, 12))
    full = m.hidden(idx)
    cache = KVCache.for_model(m, 3, 12)
    pos_all = torch.arange(12).expand(3, 12)
    parts = [m.hidden(idx[:, :5], positions=pos_all[:, :5], cache=cache)]
    for t in range(5, 10):
        parts.append(m.hidden(idx[:, t:t + 1], positions=pos_all[:, t:t + 1], cache=cache))
    parts.append(m.hidden(idx[:, 10:], positions=pos_all[:, 10:], cache=cache))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)


def test_how_each_position_scheme_sees_positions():
    """A uniform shift of positions changes learned (absolute) outputs only; RoPE is relative and
    NoPE has none. A gap in the positions changes learned and RoPE outputs, not NoPE's."""
    expect = {"learned": (True, True), "rope": (False, True), "none": (False, False)}
    for pos, (shift_changes, gap_changes) in expect.items():
        m = tiny(pos).double().eval()
        idx = torch.randint(0, 37, (1, 6))
        a = m.hidden(idx, positions=torch.arange(6)[None])
        shifted = m.hidden(idx, positions=torch.arange(6)[None] + 3)
        gapped = m.hidden(idx, positions=torch.tensor([[0, 1, 2, 7, 8, 9]]))
        assert (not torch.allclose(a, shifted)) == shift_changes, pos
        assert (not torch.allclose(a, gapped)) == gap_changes, pos


def test_rope_rotation_preserves_relative_positions():
    """q.k after RoPE depends only on the position difference (RoFormer eq. 16)."""
    m = tiny("rope").double()
    rot = m.transformer.h[0].attn.rotary
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    def dot(i, j):
        return (rot(q, torch.tensor([[i]])) * rot(k, torch.tensor([[j]]))).sum()
    assert torch.allclose(dot(7, 3), dot(14, 10))
    assert not torch.allclose(dot(7, 3), dot(7, 5))


def test_configure_optimizers_groups():
    m = tiny()
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # each parameter once (wte tied)


def test_estimate_mfu_hand_computed():
    # L=1, C=4, H=2, V=8, T=3. Non-embedding params (wte counted, tied; wpe not):
    # wte 32 + ln_1 8 + c_attn 60 + c_proj 20 + ln_2 8 + c_fc 80 + mlp.c_proj 68 + ln_f 8 = 284.
    # FLOPs/token = 6*284 + 12*L*H*(C/H)*T = 1704 + 144 = 1848; per fwd-bwd 1848*3 = 5544; x2 iters.
    m = GPT(GPTConfig(vocab_size=8, block_size=3, n_layer=1, n_head=2, n_embd=4))
    assert m.get_num_params() == 284
    assert math.isclose(m.estimate_mfu(fwdbwd_per_iter=2, dt=1.0, peak_flops=11088), 1.0)


# ---- GPT-2 interop ------------------------------------------------------------------------

def test_hf_round_trip(tmp_path):
    m = tiny()
    m.save_hf(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 24
    m2 = GPT.from_hf(tmp_path / "ckpt")
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    idx = torch.randint(0, 37, (2, 8))
    assert torch.equal(m(idx)[0], m2(idx)[0])


def test_hf_round_trip_without_bias_is_exact(tmp_path):
    m = tiny(bias=False).eval()
    m.save_hf(tmp_path)
    m2 = GPT.from_hf(tmp_path).eval()
    idx = torch.randint(0, 37, (2, 8))
    assert torch.allclose(m(idx)[0], m2(idx)[0], atol=1e-6)


def test_save_hf_refuses_non_gpt2_shapes(tmp_path):
    with pytest.raises(ValueError, match="pos='learned'"):
        tiny("rope").save_hf(tmp_path)


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_hf(tmp_path)
    tiny().save_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing.*h.2"):
        GPT.from_hf(tmp_path)
    cfg.update(n_layer=2, model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type"):
        GPT.from_hf(tmp_path)


def test_logits_match_transformers_gpt2(tmp_path):
    """Our checkpoint loads into transformers' GPT2LMHeadModel with the same logits, and a
    checkpoint written by transformers loads into ours with the same logits (1e-5)."""
    transformers = pytest.importorskip("transformers")
    m = tiny().eval()
    with torch.no_grad():  # weights large enough that GELU's tanh vs erf form (1e-3) shows
        for p in m.parameters():
            p.normal_(0, 0.3)
    m.save_hf(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 37, (2, 11))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = m(idx)[0]
    assert (ours - ref).abs().max() < 1e-5

    torch.manual_seed(1)
    hf2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=37, n_positions=24, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0)).eval()
    with torch.no_grad():
        for p in hf2.parameters():
            p.normal_(0, 0.3)
    hf2.save_pretrained(tmp_path / "theirs", safe_serialization=True)
    m2 = GPT.from_hf(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert (m2(idx)[0] - hf2(idx).logits).abs().max() < 1e-5


# ---- CoPE ------------------------------------------------------------------------------------------

from model import CoPEAttention, cope_attention_reference  # noqa: E402


@pytest.mark.parametrize("npos_max", [3, 16])
def test_cope_attention_equals_the_loop_reference(npos_max):
    """The gather-and-interpolate form against explicit loops over (i, j, t), float64: outputs and
    gradients to 1e-5 (npos_max 3 clamps most positions, 16 clamps none)."""
    torch.manual_seed(0)
    attn = CoPEAttention(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                   pos="cope", npos_max=npos_max)).double()
    torch.nn.init.normal_(attn.pos_emb, std=1.0)
    q, k, v = (torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = attn.attend(q, k, v, None)
    slow = cope_attention_reference(q, k, v, attn.pos_emb)
    assert torch.allclose(fast, slow, atol=1e-10)
    g = torch.randn_like(fast)
    inputs = (q, k, v, attn.pos_emb)
    gf = torch.autograd.grad((fast * g).sum(), inputs)
    gs = torch.autograd.grad((slow * g).sum(), inputs)
    for a, b in zip(gf, gs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_cope_attention_with_a_cache_mask_equals_the_reference():
    """Queries at positions 3..5 of rows whose cache holds 8 slots: slots past a query's position
    (unwritten, here random) neither count in the positions nor are attended to."""
    torch.manual_seed(1)
    attn = CoPEAttention(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4,
                                   pos="cope", npos_max=5)).double()
    torch.nn.init.normal_(attn.pos_emb, std=1.0)
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 1, 8, 4, dtype=torch.float64), torch.randn(1, 1, 8, 4, dtype=torch.float64)
    mask = KVCache.for_model(GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4)), 1, 8) \
        .mask(torch.tensor([[3, 4, 5]]))
    fast = attn.attend(q, k, v, mask)
    assert torch.allclose(fast, cope_attention_reference(q, k, v, attn.pos_emb, mask), atol=1e-10)
    k2 = k.clone()
    k2[:, :, 6:] = 100.0  # what sits in slots no query may see changes nothing
    assert torch.equal(attn.attend(q, k2, v, mask), fast)


def test_cope_positions_count_open_gates_between_key_and_query():
    """Gates open (logit +20) on keys 0, 3, 5 and shut (-20) elsewhere: the query at i = 5 gives
    key j the position "open gates in j..5" = 3, 2, 2, 2, 1, 1 (eq. 3), not 5 - j; npos_max 3
    clamps 3 to 2; masked keys never count."""
    attn = CoPEAttention(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=2,
                                   pos="cope", npos_max=8)).double()
    logits = torch.tensor([20.0, -20, -20, 20, -20, 20], dtype=torch.float64).view(1, 1, 1, 6)
    all_seen = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    p = attn.positions(logits, all_seen)[0, 0, 0]
    assert torch.allclose(p, torch.tensor([3.0, 2, 2, 2, 1, 1], dtype=torch.float64), atol=1e-6)
    attn.npos_max = 3
    assert torch.allclose(attn.positions(logits, all_seen)[0, 0, 0],
                          torch.tensor([2.0, 2, 2, 2, 1, 1], dtype=torch.float64), atol=1e-6)
    attn.npos_max = 8
    first_four = torch.tensor([True, True, True, True, False, False]).view(1, 1, 1, 6)
    assert torch.allclose(attn.positions(logits, first_four)[0, 0, 0],
                          torch.tensor([2.0, 1, 1, 1, 0, 0], dtype=torch.float64), atol=1e-6)


def test_cope_generation_with_cache_equals_without():
    from sampler import generate
    m = tiny("cope", npos_max=6)
    for blk in m.transformer.h:
        torch.nn.init.normal_(blk.attn.pos_emb, std=1.0)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    a = generate(m, prompts, 12, temperature=0)
    b = generate(m, prompts, 12, temperature=0, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 1


# ---- Multi-Token Attention ---------------------------------------------------------------------------

from model import CausalSelfAttention, MTAAttention, mta_attention_reference  # noqa: E402
from sampler import SharedPrefix, generate  # noqa: E402


def mta_config(**kw):
    cfg = dict(vocab_size=37, block_size=24, n_layer=2, n_head=4, n_embd=16, attn="mta", mta_cq=2,
               mta_ck=3, mta_every=1, mta_ch=2, mta_norm="gate")
    cfg.update(kw)
    return GPTConfig(**cfg)


def randomize_mta(module):
    """Kernels start at the identity, which would hide a wrong offset: make every tap matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".mta_" in "." + name:
                p.normal_()


@pytest.mark.parametrize("kq_where,head_where", [("pre", "pre"), ("pre", "post"), ("post", "pre"), ("post", "post")])
def test_mta_attention_equals_the_loop_reference(kq_where, head_where):
    """Convolution over (query, key) and head mixing against loops over every kernel tap, float64:
    outputs and the gradients of q, k, v and both kernels to 1e-5."""
    torch.manual_seed(0)
    attn = MTAAttention(mta_config(mta_cq=3, mta_ck=5, mta_kq=kq_where, mta_head=head_where)).double()
    randomize_mta(attn)
    q, k, v = (torch.randn(2, 4, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = attn.attend(q, k, v, None)
    slow = mta_attention_reference(q, k, v, attn.mta_kq, attn.mta_heads, kq_where, head_where)
    assert torch.allclose(fast, slow, atol=1e-10)
    g = torch.randn_like(fast)
    inputs = (q, k, v, attn.mta_kq, attn.mta_heads)
    gf = torch.autograd.grad((fast * g).sum(), inputs)
    gs = torch.autograd.grad((slow * g).sum(), inputs)
    for a, b in zip(gf, gs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "scale", "gate"])
def test_mta_at_init_is_standard_attention_plus_the_output_norm(norm):
    """Identity kernels: the attention map is the standard one; only the per-head RMSNorm and its
    scale (1 - lambda_l) or gate change the output."""
    torch.manual_seed(0)
    layer = 2
    cfg = mta_config(mta_norm=norm, mta_cq=6, mta_ck=11, pos="rope")
    mta = MTAAttention(cfg, layer).double()
    std = CausalSelfAttention(cfg).double()
    std.load_state_dict({k: v for k, v in mta.state_dict().items() if k.startswith(("c_attn", "c_proj"))})
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pos = torch.arange(9).expand(2, 9)
    q, k, v = std.qkv(x, pos)
    y = std.attend(q, k, v, None)  # (B, H, T, D)
    if norm != "none":
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
        if norm == "scale":
            y = y * (1 - (0.8 - 0.6 * math.exp(-0.3 * layer)))
        else:
            y = y * torch.sigmoid(y @ mta.gate.weight.t() + mta.gate.bias)
    want = std.c_proj(y.transpose(1, 2).reshape(2, 9, 16))
    assert torch.allclose(mta(x, pos, None), want, atol=1e-10)
    if norm == "none":
        assert torch.allclose(mta(x, pos, None), std(x, pos, None), atol=1e-10)


def test_mta_layers_with_the_key_query_convolution():
    """mta_every = 4: layers 3 and 7 of 8 (every 4th); head mixing and the norm on every layer."""
    m = GPT(mta_config(n_layer=8, mta_every=4))
    assert [i for i, b in enumerate(m.transformer.h) if b.attn.mta_kq is not None] == [3, 7]
    assert all(b.attn.mta_heads.shape == (2, 2, 2) for b in m.transformer.h)
    assert GPT(mta_config(n_layer=3, mta_every=1)).transformer.h[0].attn.mta_kq.shape == (4, 1, 2, 3)
    assert GPT(mta_config(mta_ch=1)).transformer.h[0].attn.mta_heads is None


@pytest.mark.parametrize("kq_where", ["pre", "post"])
def test_mta_sees_no_future_tokens(kq_where):
    """A wide random kernel centred on the key reaches past the diagonal; the logits before a
    position must not move when later tokens change."""
    torch.manual_seed(0)
    m = GPT(mta_config(mta_cq=3, mta_ck=7, mta_kq=kq_where, pos="rope"))
    randomize_mta(m)
    idx = torch.randint(0, 37, (2, 12))
    idx2 = idx.clone()
    idx2[:, 7:] = torch.randint(0, 37, (2, 5))
    a, b = m(idx)[0], m(idx2)[0]
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


@pytest.mark.parametrize("kq_where", ["pre", "post"])
def test_mta_prefill_and_decode_with_cache_equal_the_full_forward(kq_where):
    """Ragged prompts prefilled into a KV cache, then one token at a time: each step's hidden
    state equals the no-cache forward over the whole sequence (the cache keeps the queries)."""
    torch.manual_seed(0)
    m = GPT(mta_config(mta_cq=3, mta_ck=5, mta_kq=kq_where, pos="rope")).double().eval()
    randomize_mta(m)
    seq = torch.randint(0, 37, (2, 10))
    cache = KVCache.for_model(m, 2, 12)
    h_pre = m.hidden(seq[:, :6], positions=torch.arange(6).expand(2, 6), cache=cache)
    steps = [m.hidden(seq[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache) for t in range(6, 10)]
    full = m.hidden(seq)
    assert torch.allclose(h_pre, full[:, :6], atol=1e-10)
    assert torch.allclose(torch.cat(steps, 1), full[:, 6:], atol=1e-10)


@pytest.mark.parametrize("kq_where", ["pre", "post"])
def test_mta_generation_with_cache_equals_without(kq_where):
    torch.manual_seed(0)
    m = GPT(mta_config(mta_cq=3, mta_ck=5, mta_kq=kq_where, pos="rope"))
    randomize_mta(m)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    a = generate(m, prompts, 12, temperature=0)
    b = generate(m, prompts, 12, temperature=0, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 1
    a = generate(m, prompts, 12, temperature=1.0, seed=3, num_samples=2)  # repeat_rows copies queries
    b = generate(m, prompts, 12, temperature=1.0, seed=3, num_samples=2, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_mta_with_a_cache_that_keeps_no_queries_is_a_clear_error():
    m = GPT(mta_config())
    cache = SharedPrefix(torch.tensor([3, 2]), 1)
    with pytest.raises(TypeError, match="needs the queries of earlier positions.*SharedPrefix"):
        m.hidden(torch.randint(0, 37, (2, 3)), positions=torch.arange(3).expand(2, 3), cache=cache)


def test_mta_kernels_are_not_weight_decayed():
    m = GPT(mta_config())
    opt = m.configure_optimizers(0.1, 1e-3)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    kernels = [p for n, p in m.named_parameters() if ".mta_" in n]
    assert kernels and all(id(p) in no_decay for p in kernels)
    assert id(m.transformer.h[0].attn.c_attn.weight) not in no_decay


@pytest.mark.parametrize("kw,msg", [
    (dict(mta_ck=4), "mta_ck must be odd"),
    (dict(mta_ch=3), "not divisible by mta_ch"),
    (dict(mta_cq=0), "mta_cq must be a positive int"),
    (dict(mta_kq="mid"), "mta_kq must be one of"),
    (dict(mta_norm="layer"), "mta_norm must be one of"),
    (dict(pos="cope"), "pos='cope' is its own attention"),
])
def test_mta_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        mta_config(**kw)
