"""tokenloom.kernels.speculative_accept: exactness on an enumerable toy AR model, batching, bad input."""

import itertools

import pytest
import torch
from scipy.stats import chisquare

from tokenloom.kernels import speculative_accept

V, L, W = 4, 3, 2  # vocabulary, sequence length, drafts per step


class ToyAR:
    """Fixed random conditional tables ``p(x_t | x_<t)`` for every prefix up to length ``L + W``."""

    def __init__(self, seed, sharpness=1.0):
        g = torch.Generator().manual_seed(seed)
        self.offsets, tables, offset = [], [], 0
        for length in range(L + W + 1):
            self.offsets.append(offset)
            logits = torch.randn(V**length, V, generator=g) * sharpness
            tables.append(torch.softmax(logits, -1))
            offset += V**length
        self.table = torch.cat(tables).double()

    def probs(self, code, length):
        """``[N, V]`` next-token probabilities after prefixes ``code`` (base-V) of ``length`` ``[N]``."""
        return self.table[torch.as_tensor(self.offsets)[length] + code]

    def joint(self):
        """Exact ``[V**L]`` probabilities of every length-L sequence (code order)."""
        out = torch.empty(V**L, dtype=torch.float64)
        for seq in itertools.product(range(V), repeat=L):
            prob, code = 1.0, 0
            for t, tok in enumerate(seq):
                prob *= float(self.table[self.offsets[t] + code, tok])
                code = code * V + tok
            out[code] = prob
        return out


def _speculative_sequences(target, draft, n, seed, deterministic):
    """Sample ``n`` length-L sequences by repeated draft-W-then-accept steps; returns their codes ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, L + W + 1, dtype=torch.long)
    length = torch.zeros(n, dtype=torch.long)
    while bool((length < L).any()):
        active = length < L
        ln = torch.where(active, length, 0)  # finished rows redo a harmless empty-prefix step
        c = _codes(tokens, ln)
        drafts, q, p = [], [], []
        for _ in range(W):
            qi = draft.probs(c, ln)
            p.append(target.probs(c, ln))
            x = qi.argmax(-1) if deterministic else torch.multinomial(qi.float(), 1, generator=gen)[:, 0]
            drafts.append(x)
            q.append(qi)
            c, ln = c * V + x, ln + 1
        p.append(target.probs(c, ln))
        drafts = torch.stack(drafts, 1)
        n_acc, nxt = speculative_accept(drafts, torch.stack(p, 1), gen,
                                        draft_probs=None if deterministic else torch.stack(q, 1))
        assert bool(((n_acc >= 0) & (n_acc <= W)).all()) and bool((nxt >= 0).all())
        new = torch.cat([drafts, torch.zeros(n, 1, dtype=torch.long)], 1)
        new[torch.arange(n), n_acc] = nxt
        for j in range(W + 1):  # write accepted drafts and the next token after each row's prefix
            write = active & (j <= n_acc)
            tokens[write, (length + j)[write]] = new[write, j]
        length = torch.where(active, length + n_acc + 1, length)
    return _codes(tokens, torch.full_like(length, L))


def _codes(tokens, length):
    code = torch.zeros(tokens.shape[0], dtype=torch.long)
    for t in range(tokens.shape[1]):
        code = torch.where(t < length, code * V + tokens[:, t], code)
    return code


@pytest.mark.parametrize("deterministic", [False, True])
def test_speculative_sampling_reproduces_the_target_joint(deterministic):
    target, draft = ToyAR(seed=0, sharpness=1.5), ToyAR(seed=1, sharpness=1.5)
    n = 120_000
    codes = _speculative_sequences(target, draft, n, seed=3, deterministic=deterministic)
    counts = torch.bincount(codes, minlength=V**L).double()
    assert _p_value(counts, target.joint()) > 1e-3
    # The draft's own joint is far from the target's: the test would catch "always accept".
    assert _p_value(counts, draft.joint()) < 1e-6


def _p_value(counts, probs):
    return float(chisquare(counts.numpy(), (probs * counts.sum() / probs.sum()).numpy()).pvalue)


def test_equal_distributions_accept_everything_and_bonus_is_drawn():
    g = torch.Generator().manual_seed(0)
    b, w, v = 64, 3, 10
    p = torch.softmax(torch.randn(b, w + 1, v, generator=g), -1)
    drafts = torch.multinomial(p[:, :w].reshape(-1, v), 1, generator=g).view(b, w)
    n_acc, nxt = speculative_accept(drafts, p, g, draft_probs=p[:, :w].clone())
    assert bool((n_acc == w).all()) and bool((nxt >= 0).all())
    n_acc, nxt = speculative_accept(drafts, p[:, :w], g, draft_probs=p[:, :w].clone())
    assert bool((n_acc == w).all()) and bool((nxt == -1).all())


def test_zero_target_probability_rejects_and_resamples_elsewhere():
    b, w, v = 32, 2, 5
    p = torch.full((b, w + 1, v), 0.25)
    p[:, :, 0] = 0.0
    drafts = torch.zeros(b, w, dtype=torch.long)  # p(draft) = 0: always rejected at position 0
    n_acc, nxt = speculative_accept(drafts, p, torch.Generator().manual_seed(1))
    assert bool((n_acc == 0).all()) and bool((nxt != 0).all())


def test_per_row_generators_are_independent():
    g = torch.Generator().manual_seed(2)
    b, w, v = 5, 4, 6
    p = torch.softmax(torch.randn(b, w + 1, v, generator=g), -1)
    q = torch.softmax(torch.randn(b, w, v, generator=g), -1)
    drafts = torch.randint(0, v, (b, w), generator=g)
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    a = speculative_accept(drafts, p, gens, draft_probs=q)
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    gens[2] = torch.Generator().manual_seed(99)
    c = speculative_accept(drafts, p, gens, draft_probs=q)
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.equal(a[0][keep], c[0][keep]) and torch.equal(a[1][keep], c[1][keep])


def test_bad_input_is_named():
    p = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="target_probs must have shape"):
        speculative_accept(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 5, 4), 0.25))
    with pytest.raises(ValueError, match="draft_probs must be None or have shape"):
        speculative_accept(torch.zeros(2, 2, dtype=torch.long), p, draft_probs=torch.full((2, 2, 5), 0.2))
    with pytest.raises(ValueError, match=r"draft_tokens must lie in \[0, 4\)"):
        speculative_accept(torch.full((2, 2), 4, dtype=torch.long), p)
    with pytest.raises(ValueError, match="draft_tokens must be an integer tensor"):
        speculative_accept(torch.zeros(2, 2), p)
    with pytest.raises(ValueError, match="target_probs must be finite and >= 0"):
        speculative_accept(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 3, 4), float("nan")))
