"""Predict a user's next rating (mean squared error) from the user's time-ordered ratings.

Generated data: every user has a hidden taste (bias and a drift over time), items have a known
quality feature. At each step the model sees the previous rating and the next item's quality and
predicts the rating the user will give it; a GRU (``rnnrec_fast.GRU``) tracks the user's taste from
the history. Baselines: the global mean rating, and item quality + the user's running mean offset.

    python examples/next_rating.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rnnrec_fast


def make_data(n_users: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(n_users, 1, generator=g) * 0.8
    drift = torch.randn(n_users, 1, generator=g) * 0.04
    quality = torch.randn(n_users, length, generator=g) * 0.7  # quality of the item rated at step t
    t = torch.arange(length).float().unsqueeze(0)
    ratings = (3.2 + bias + drift * t + quality + 0.3 * torch.randn(n_users, length, generator=g)).clamp(1, 5)
    prev = torch.cat([torch.full((n_users, 1), 3.2), ratings[:, :-1]], 1)  # rating before step t
    feats = torch.stack([prev - 3.2, quality, (t / length).expand(n_users, -1)], 2)
    return feats, ratings


class NextRating(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.rnn = rnnrec_fast.GRU(3, hidden, batch_first=True)
        self.out = nn.Linear(hidden + 1, 1)

    def forward(self, feats):
        y, _ = self.rnn(feats)
        return 3.2 + self.out(torch.cat([y, feats[..., 1:2]], -1)).squeeze(-1)


def run(seed: int = 0, epochs: int = 40, n_users: int = 512, length: int = 25, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    x, r = make_data(n_users, length, seed)
    xt, rt = make_data(256, length, seed + 1)
    model = NextRating()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(epochs):
        for i in range(0, n_users, 64):
            loss = F.mse_loss(model(x[i:i + 64]), r[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if verbose and (epoch % 10 == 0 or epoch == epochs - 1):
            print(f"epoch {epoch + 1:3d}  train MSE {losses[-1]:.4f}")
    with torch.no_grad():
        test_mse = float(F.mse_loss(model(xt), rt))
    base_mean = float(F.mse_loss(torch.full_like(rt, float(r.mean())), rt))
    # item quality + the user's mean offset so far (a strong hand-made baseline)
    q = xt[..., 1]
    off = torch.cumsum(rt - 3.2 - q, 1) - (rt - 3.2 - q)
    n = torch.arange(rt.shape[1]).clamp(min=1).float()
    base_run = float(F.mse_loss((3.2 + q + off / n).clamp(1, 5), rt))
    res = dict(first_loss=losses[0], last_loss=losses[-1], test_mse=test_mse, baseline_mse=base_mean,
               running_mean_mse=base_run)
    if verbose:
        print(f"test MSE {test_mse:.4f} (global mean {base_mean:.4f}, quality + running user offset "
              f"{base_run:.4f})")
    return res


if __name__ == "__main__":
    run()
