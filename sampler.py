"""
Batched generation with a preallocated KV cache (the gpt-fast recipe), and its slow twin.

    out = generate(model, [[5, 9, 2], [7]], max_new_tokens=32, temperature=1.0, stop_tokens=[eos])
    out.tokens    # (B, N) long: sampled tokens, padding after a row stopped
    out.logprobs  # (B, N) float32: log-prob of each token under the distribution it was drawn from
    out.lengths   # (B,) long: generated tokens per row, the stop token included

Ragged prompts are right-padded and every row keeps its own positions: row b's prompt sits at
positions 0..L_b-1 and its t-th new token at position L_b + t. The cache has one slot per
position, so a row's new key/value overwrites the padding slot at that position before any query
can see it (a query at position p sees slots 0..p of its own row, model.GPT.hidden builds that
mask). Masks for the caller come from `lengths`, never from comparing tokens with a pad id.

`use_cache=False` recomputes the full forward over every sequence at every step: slow and
obviously correct; the tests compare the two.
"""
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm import tqdm

import kernels


class KVCache:
    """Keys and values for every layer, allocated once for (batch, max_len) and written in place
    at each token's position: no torch.cat growth, so a decode step costs the same at any position."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.q = None  # queries, for MTA's key-query convolution only (allocated on first use)

    @classmethod
    def for_model(cls, model, batch_size, max_len):
        cfg = model.config
        if max_len > cfg.block_size:
            raise ValueError(f"KVCache: max_len {max_len} exceeds the model's block_size {cfg.block_size}")
        p = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head, p.dtype, p.device)

    def update(self, layer, k, v, positions):
        """k, v (B, H, T, D) go to slots `positions` (B, T); returns the layer's whole cache
        (B, H, max_len, D). Indexing [rows, :, positions] puts the (B, T) index dims first."""
        self.k[layer][self.rows, :, positions] = k.transpose(1, 2)
        self.v[layer][self.rows, :, positions] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def update_queries(self, layer, q, positions):
        """MTA (model.MTAAttention) mixes the scores of the c_q - 1 previous queries into a
        query's, so decoding needs those queries as well: kept like the keys, slot = position."""
        if self.q is None:
            self.q = torch.zeros_like(self.k)
        self.q[layer][self.rows, :, positions] = q.transpose(1, 2)
        return self.q[layer]

    def mask(self, positions):
        """(B, 1, T, max_len) bool: a query at position p sees its row's slots 0..p (slot = position)."""
        slots = torch.arange(self.max_len, device=positions.device)
        return (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)

    def repeat_rows(self, n):
        """A new cache with each row repeated n times (row b -> rows b*n .. b*n + n-1): a prompt
        prefilled once serves n samples."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        out.q = None if self.q is None else self.q.repeat_interleave(n, dim=1)
        out.max_len = self.max_len
        out.rows = torch.arange(out.k.size(1), device=out.k.device)[:, None]
        return out


def prefill(model, cache, idx, lengths):
    """Run the right-padded prompts idx (B, T) through the model, filling the cache.
    Returns float32 logits (B, V) at each row's last prompt token (position lengths - 1)."""
    B, T = idx.shape
    positions = torch.arange(T, device=idx.device).expand(B, T)
    h = model.hidden(idx, positions=positions, cache=cache)  # (B, T, C)
    last = h[torch.arange(B, device=idx.device), lengths - 1]  # (B, C): lm_head on B rows, not B*T
    return model.lm_head(last).float()


def decode_one_token(model, cache, tok, pos):
    """Feed one token per row, tok (B,) at positions pos (B,). Returns float32 logits (B, V)."""
    h = model.hidden(tok[:, None], positions=pos[:, None], cache=cache)
    return model.lm_head(h[:, 0]).float()


def full_forward(model, seq, pos):
    """The slow twin of decode_one_token: recompute everything in seq (B, S) and return float32
    logits (B, V) at each row's position pos (B,). Causal attention means the right padding
    beyond a row's end cannot change its logits."""
    h = model.hidden(seq)
    return model.lm_head(h[torch.arange(seq.size(0), device=seq.device), pos]).float()


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> logits / T with the tokens outside top-k / top-p set to -inf (in that
    order, as most libraries do). top-p keeps the smallest set of most likely tokens whose mass
    reaches p (nucleus sampling, arXiv 1904.09751); the most likely token is always kept."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p  # first column has mass_before 0, so it is never dropped
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, split=None):
    """Draw one token per row from float32 logits (B, V). Returns (tokens (B,), logprobs (B,)),
    the log-prob under the filtered distribution the token was drawn from. temperature=0 is
    greedy: the distribution is a point mass, so its log-prob is 0. On CUDA with kernels_cuda
    built and no top-k / top-p, kernels.sample_tokens draws in one pass (Gumbel-max).

    The draw is argmax(p / E) with E ~ Exp(1) i.i.d. per element (the exponential race; argmax
    of p / E has law p), which is what torch.multinomial(p, 1) computes, bit for bit.
    split = (first, total): these B rows are rows first..first+B-1 of a total-row batch that other
    processes sample the rest of; the noise is drawn for all total rows and sliced, so a batch
    split across processes draws exactly the tokens one process drawing it whole would."""
    if temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.size(0), device=logits.device)
    first, total = split or (0, logits.size(0))
    if logits.is_cuda and kernels.HAVE_CUDA_KERNELS and top_k is None and (top_p is None or top_p >= 1.0):
        return kernels.sample_tokens(logits, temperature, generator, split)  # one fused pass per row
    logp = F.log_softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    B, V = logp.shape
    noise = torch.empty(total, V, device=logp.device).exponential_(generator=generator)[first:first + B]
    tok = (logp.exp() / noise).argmax(dim=-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, N) long, pad_id after a row's length
    logprobs: torch.Tensor  # (B, N) float32, 0 after a row's length
    lengths: torch.Tensor   # (B,) long, stop token included

    def completions(self):
        """The generated token ids of each row as lists, cut at their lengths."""
        return [row[:n].tolist() for row, n in zip(self.tokens.cpu(), self.lengths.cpu())]

    def mask(self):
        """(B, N) float mask: 1 on generated tokens (stop token included), 0 on padding."""
        N = self.tokens.size(1)
        return (torch.arange(N, device=self.lengths.device)[None, :] < self.lengths[:, None]).float()


def _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id):
    V, block = model.config.vocab_size, model.config.block_size
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty; give at least one token (e.g. BOS)")
        if len(p) > block:
            raise ValueError(f"generate: prompt {i} has {len(p)} tokens, longer than block_size {block}")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"generate: prompt {i} has a token id outside [0, {V})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > block:
        raise ValueError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {longest + max_new_tokens} positions, beyond the "
                         f"cache the model allows (block_size {block}); shorten one of them")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    for t in list(stop_tokens) + [pad_id]:
        if not 0 <= t < V:
            raise ValueError(f"generate: stop/pad token {t} is outside the vocabulary [0, {V})")


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
             stop_tokens=(), seed=None, use_cache=True, pad_id=0, progress=False, num_samples=1, split=None):
    """Sample continuations of `prompts` (a list of token-id lists, any lengths). Stopping is per
    row (the stop token is kept and counted in lengths); the loop ends when every row stopped.
    seed makes the draw reproducible; the model is put in eval mode for the call.
    num_samples > 1 samples each prompt that many times (rows prompt-major: row i * n + j is
    prompt i's j-th sample), prefilling each prompt once and copying its cache rows.
    split = (first, total): this call samples rows first.. of a total-row batch (counted after
    num_samples) split across processes; see sample_next. With the same seed, the split draws
    the tokens one call over the whole batch would."""
    _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
    n_prompts = len(prompts)
    prompts = [p for p in prompts for _ in range(num_samples)]
    if split is not None and not (0 <= split[0] and split[0] + len(prompts) <= split[1]):
        raise ValueError(f"generate: split (first, total) = {split} do not hold this call's {len(prompts)} rows")
    device = next(model.parameters()).device
    B, N = len(prompts), max_new_tokens
    lens = torch.tensor([len(p) for p in prompts], device=device)
    T = int(lens.max())
    seq = torch.full((B, T + N), pad_id, dtype=torch.long, device=device)  # prompt + new tokens
    for b, p in enumerate(prompts):
        seq[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    rows = torch.arange(B, device=device)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)

    tokens = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, device=device)
    lengths = torch.full((B,), N, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    if use_cache:
        cache = KVCache.for_model(model, n_prompts, T + N)
        firsts = slice(None, None, num_samples)  # one row per distinct prompt
        logits = prefill(model, cache, seq[firsts, :T], lens[firsts])
        if num_samples > 1:
            cache, logits = cache.repeat_rows(num_samples), logits.repeat_interleave(num_samples, dim=0)
    else:
        logits = full_forward(model, seq[:, :T], lens - 1)
    for t in tqdm(range(N), desc="generate", disable=not progress):
        tok, lp = sample_next(logits, temperature, top_k, top_p, generator, split)
        tokens[:, t] = torch.where(done, pad_id, tok)
        logprobs[:, t] = torch.where(done, 0.0, lp)
        stopped = ~done & torch.isin(tok, stop)
        lengths = torch.where(stopped, t + 1, lengths)
        done |= stopped
        if t == N - 1 or (len(stop) and bool(done.all())):
            break
        pos = lens + t  # where this step's token sits
        if use_cache:
            logits = decode_one_token(model, cache, tokens[:, t], pos)
        else:  # only the slow twin re-reads the whole sequence
            seq[rows, pos] = tokens[:, t]
            logits = full_forward(model, seq[:, :T + t + 1], pos)
    model.train(was_training)
    return Generation(tokens, logprobs, lengths)


# ---- text in, text out: what the algorithm scripts call -------------------------------------

def sample_texts(model, tokenizer, prompts, max_new_tokens, **kwargs):
    """BOS + prompt -> generate until EOS -> text. Returns (Generation, texts, finished): texts
    without the EOS; finished[i] is False when row i hit max_new_tokens before emitting EOS.
    kwargs go to generate (temperature, top_k, top_p, seed, num_samples, ...); with num_samples =
    n the outputs have n rows per prompt, prompt-major."""
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    out = generate(model, ids, max_new_tokens, stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id, **kwargs)
    texts, finished = [], []
    for comp in out.completions():
        done = len(comp) > 0 and comp[-1] == tokenizer.eos_id
        texts.append(tokenizer.decode(comp[:-1] if done else comp))
        finished.append(done)
    return out, texts, finished


def evaluate(model, tokenizer, problems, reward_fn, max_new_tokens, batch_size=256, **kwargs):
    """Greedy (unless kwargs say otherwise) completions of problems [{"prompt": ...}], scored by
    reward_fn(prompt, text); a completion that never emitted EOS scores 0. Returns accuracy (the
    mean reward) and the mean number of generated tokens per answer (EOS included)."""
    kwargs.setdefault("temperature", 0.0)
    total, tokens = 0.0, 0
    for i in range(0, len(problems), batch_size):
        prompts = [p["prompt"] for p in problems[i:i + batch_size]]
        out, texts, finished = sample_texts(model, tokenizer, prompts, max_new_tokens, **kwargs)
        total += sum(reward_fn(p, t) if f else 0.0 for p, t, f in zip(prompts, texts, finished))
        tokens += int(out.lengths.sum())
    return {"accuracy": total / len(problems), "mean_tokens": tokens / len(problems)}


# ---- RL: sample a group per prompt, score it, and re-score the same tokens with gradients ------

@dataclass
class Rollout:
    """G completions per problem, rows problem-major (row i * G + g is problem i's g-th sample)."""
    problems: list          # [{"prompt", ...}], one per row (each problem repeated G times)
    prompts: list           # BOS + prompt token ids, one list per row
    tokens: torch.Tensor    # (B, N) long, N = max_new_tokens for every rollout, so rollouts concatenate
    logprobs: torch.Tensor  # (B, N) float32: the sampler's log-probs (the distribution drawn from)
    lengths: torch.Tensor   # (B,) long, EOS included when emitted
    finished: torch.Tensor  # (B,) bool: EOS emitted within max_new_tokens
    rewards: torch.Tensor   # (B,) float32: the task's reward; 0 for an unfinished completion
    texts: list             # decoded completions without EOS

    def mask(self):
        return Generation(self.tokens, self.logprobs, self.lengths).mask()

    def take(self, rows):
        """The rows `rows` (a list of ints) as a new Rollout."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        return Rollout([self.problems[r] for r in rows], [self.prompts[r] for r in rows],
                       self.tokens[idx], self.logprobs[idx], self.lengths[idx], self.finished[idx],
                       self.rewards[idx], [self.texts[r] for r in rows])

    @staticmethod
    def cat(parts):
        return Rollout(sum((p.problems for p in parts), []), sum((p.prompts for p in parts), []),
                       torch.cat([p.tokens for p in parts]), torch.cat([p.logprobs for p in parts]),
                       torch.cat([p.lengths for p in parts]), torch.cat([p.finished for p in parts]),
                       torch.cat([p.rewards for p in parts]), sum((p.texts for p in parts), []))


def rollout(model, tokenizer, problems, reward_fn, group_size, max_new_tokens, **kwargs):
    """Sample group_size completions of each problem (kwargs go to generate: temperature, seed, ...)
    and score each with reward_fn(prompt, text). A completion that never emitted EOS scores 0:
    with no end there is no answer to check. Each prompt is prefilled once for its group. No
    problems (a rank whose share of a split batch is empty) give an empty Rollout."""
    if not problems:
        device = next(model.parameters()).device
        none = torch.zeros(0, max_new_tokens, dtype=torch.long, device=device)
        return Rollout([], [], none, none.float(), none[:, 0], none[:, 0].bool(), none[:, 0].float(), [])
    rows = [p for p in problems for _ in range(group_size)]
    out, texts, finished = sample_texts(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens,
                                        num_samples=group_size, **kwargs)
    rewards = [reward_fn(p["prompt"], t) if f else 0.0 for p, t, f in zip(rows, texts, finished)]
    device = out.tokens.device
    return Rollout(rows, [[tokenizer.bos_id] + tokenizer.encode(p["prompt"]) for p in rows],
                   out.tokens, out.logprobs, out.lengths, torch.tensor(finished, device=device),
                   torch.tensor(rewards, dtype=torch.float32, device=device), texts)


class SharedPrefix:
    """The attention "cache" of a training forward over G completions per prompt that runs each
    prompt once (Rollout rows are prompt-major groups, so most of a row is its shared prompt).

    Pass 1 (recording): model.hidden over the P distinct prompts, right-padded to Tp; each
    layer's keys / values are kept, autograd graph attached, and attention is causal.
    Pass 2: model.hidden over the B = P * G completions at positions L_b + t; each layer attends
    to [its prompt's keys, repeated G times | the completion's own keys], seeing prompt slots
    below L_b and completion slots up to its own. The gradient reaching a prompt's keys is the
    sum over its G completions, which is what the G separate forwards would give."""

    def __init__(self, prompt_lengths, group_size):
        self.plen, self.G, self.Tp = prompt_lengths, group_size, int(prompt_lengths.max())
        self.k, self.v, self.recording = {}, {}, True

    def update(self, layer, k, v, positions):
        if self.recording:
            self.k[layer], self.v[layer] = k, v
            return k, v
        k0 = self.k[layer].repeat_interleave(self.G, dim=0)
        v0 = self.v[layer].repeat_interleave(self.G, dim=0)
        return torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)

    def mask(self, positions):
        B, T = positions.shape
        device = positions.device
        if self.recording:  # positions are 0..Tp-1 on every row: plain causal
            return (torch.arange(T, device=device)[None, :] <= positions[:, :, None]).unsqueeze(1)
        plen = self.plen.repeat_interleave(self.G)
        prompt = torch.arange(self.Tp, device=device)[None, None, :] < plen[:, None, None]  # (B, 1, Tp)
        own = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # completion slots <= t
        return torch.cat([prompt.expand(B, T, self.Tp), own.expand(B, T, T)], dim=2).unsqueeze(1)


def completion_logprobs(model, prompts, tokens, lengths, temperature=1.0, return_entropy=False,
                        pad_id=0, group_size=1, return_hidden=False):
    """log pi(token_t | prompt, tokens_<t) at `temperature` for every completion token, with
    gradients: a training-mode forward over prompt + completion.

    prompts: token-id lists (B); tokens (B, N); lengths (B,). Returns (B, N) float32 aligned with
    tokens (0 after a row's length); with return_entropy / return_hidden a tuple (logprobs,
    [entropy (B, N)], [hidden (B, N, C): the final hidden state each token is predicted from,
    which is where PPO's value head reads V(s_t)]). The logits at position p predict the
    token at p + 1, so completion token t of row b (position L_b + t) is read at L_b + t - 1. The
    unembedding is fused into the log-prob (kernels.hidden_logprobs): no (B, T, V) logits kept.

    group_size = G > 1: rows come in groups of G sharing one prompt (checked); each prompt then
    runs once and its G completions attend to it (SharedPrefix), which for short answers to
    long prompts is most of the work saved. group_size = 1 is the plain, obviously-correct twin
    (one right-padded forward per row); the tests compare the two in values and gradients."""
    device = tokens.device
    B, N = tokens.shape
    if group_size > 1:
        if B % group_size or any(prompts[i] != prompts[i - i % group_size] for i in range(B)):
            raise ValueError(f"completion_logprobs: group_size {group_size} needs rows in groups of "
                             f"{group_size} with one prompt each")
        return _grouped_completion_logprobs(model, prompts[::group_size], tokens, lengths,
                                            temperature, return_entropy, group_size, return_hidden)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    W = int((plen + lengths).max())  # positions in use; the last one is only ever a target
    seq = torch.full((B, int(plen.max()) + N), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        seq[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    rows = torch.arange(B, device=device)[:, None]
    t = torch.arange(N, device=device)[None, :]
    live = t < lengths[:, None]  # (B, N)
    seq[rows, plen[:, None] + t] = torch.where(live, tokens, pad_id)
    seq = seq[:, :W]
    read = (plen[:, None] + t - 1).clamp(max=W - 2)  # where each completion token's log-prob is read
    targets = torch.full((B, W - 1), -100, dtype=torch.long, device=device)
    targets[rows.expand(B, N)[live], read[live]] = tokens[live]
    hidden = model.hidden(seq[:, :-1])
    out = kernels.hidden_logprobs(hidden, model.lm_head.weight, targets, temperature,
                                  return_entropy=return_entropy)
    lp, ent = out if return_entropy else (out, None)
    outs = [torch.where(live, lp.gather(1, read), 0.0)]
    if return_entropy:
        outs.append(torch.where(live, ent.gather(1, read), 0.0))
    if return_hidden:
        outs.append(hidden.gather(1, read[:, :, None].expand(B, N, hidden.size(-1))) * live[:, :, None])
    return outs[0] if len(outs) == 1 else tuple(outs)


def _grouped_completion_logprobs(model, prompts, tokens, lengths, temperature, return_entropy, G,
                                 return_hidden):
    device = tokens.device
    B, N = tokens.shape
    P = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    Tp = int(plen.max())
    pseq = torch.zeros((P, Tp), dtype=torch.long, device=device)  # padding is never attended to
    for i, p in enumerate(prompts):
        pseq[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    cache = SharedPrefix(plen, G)
    hp = model.hidden(pseq, positions=torch.arange(Tp, device=device).expand(P, Tp), cache=cache)
    first = hp[torch.arange(P, device=device), plen - 1].repeat_interleave(G, dim=0)  # predicts token 0
    W = int(lengths.max())
    hidden = first[:, None]
    if W > 1:  # completion token t (t < W - 1) at position L_b + t predicts token t + 1
        cache.recording = False
        pos = plen.repeat_interleave(G)[:, None] + torch.arange(W - 1, device=device)[None, :]
        hidden = torch.cat([hidden, model.hidden(tokens[:, :W - 1], positions=pos, cache=cache)], dim=1)
    live = torch.arange(W, device=device)[None, :] < lengths[:, None]  # (B, W)
    targets = torch.where(live, tokens[:, :W], -100)
    out = kernels.hidden_logprobs(hidden, model.lm_head.weight, targets, temperature,
                                  return_entropy=return_entropy)
    outs = [F.pad(o, (0, N - W)) for o in (out if return_entropy else (out,))]
    if return_hidden:
        outs.append(F.pad(hidden * live[:, :, None], (0, 0, 0, N - W)))
    return outs[0] if len(outs) == 1 else tuple(outs)


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n - c, k) / C(n, k), the chance that k of the n samples, drawn without replacement,
    include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a product, no huge integers
        fail *= 1.0 - k / i
    return 1.0 - fail


@torch.no_grad()
def evaluate_pass_at_k(model, tokenizer, problems, reward_fn, k, max_new_tokens, n=None,
                       batch_size=256, **kwargs):
    """Mean unbiased pass@k over problems, from n >= k sampled completions each (n defaults to k;
    kwargs go to generate, e.g. temperature and seed)."""
    n = k if n is None else n
    per_batch = max(1, batch_size // n)
    seed = kwargs.pop("seed", None)
    total = 0.0
    for i in range(0, len(problems), per_batch):
        chunk = problems[i:i + per_batch]
        ro = rollout(model, tokenizer, chunk, reward_fn, n, max_new_tokens,
                     seed=None if seed is None else seed + i, **kwargs)
        correct = (ro.rewards.view(len(chunk), n) >= 1.0).sum(1).tolist()
        total += sum(pass_at_k(n, c, k) for c in correct)
    return total / len(problems)
