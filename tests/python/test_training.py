"""A small PyTorch decoder trained 30 steps with altgrad.attention(method="poly", degree=2) equals
the same model with the pure-torch polynomial attention of reference.py: losses within 1e-8 in
float64 at every step."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import altgrad
import reference as ref


class Block(nn.Module):
    """Pre-norm decoder block: causal GQA attention + GELU MLP, residuals."""

    def __init__(self, dim, heads, kv_heads, attn):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * self.hd, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn = attn

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, self.hd)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.hd).unbind(dim=2)
        x = x + self.o(self.attn(q, k, v).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, vocab, dim, layers, heads, kv_heads, seq, attn):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def rust_poly(q, k, v):
    return altgrad.attention(q, k, v, method="poly", causal=True, degree=2)


def torch_poly(q, k, v):
    return ref.poly_attention(q, k, v, causal=True, degree=2)


def train(model, data, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        ids = data[step % len(data)]
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_loop_matches_pure_torch_poly_attention():
    torch.manual_seed(0)
    vocab, seq = 48, 33
    a = Decoder(vocab, dim=32, layers=2, heads=4, kv_heads=2, seq=seq, attn=rust_poly).double()
    b = copy.deepcopy(a)
    for blk in b.blocks:
        blk.attn = torch_poly
    # Learnable structure: each sequence repeats a random 8-token pattern.
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, vocab, (4, 8), generator=g).repeat(1, 5)[:, :seq] for _ in range(6)]
    la, lb = train(a, data, 30), train(b, data, 30)
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    assert max(diffs) < 1e-8, diffs
    assert la[-1] < 0.8 * la[0], la  # it learns
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert ref.rel_err(pa.detach(), pb.detach()) < 1e-8
