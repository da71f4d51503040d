"""Predict a binary next action (will the user buy next?) from the behaviour sequence, with a
single-layer Elman RNN (``rnnrec_fast.RNN``), a sigmoid output and binary cross-entropy.

The data is generated: each user emits a sequence of behaviours (0 view, 1 search, 2 add-to-cart,
3 remove-from-cart, 4 wishlist); the next action is a purchase with a probability that rises with
the carts still open in the recent past and falls with removals, so it depends on the order of the
sequence, not just on its last element.

    python examples/next_action_rnn.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rnnrec_fast

N_BEHAVIOURS = 5


def make_data(n_users: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(torch.tensor([0.45, 0.2, 0.15, 0.1, 0.1]), n_users * length, replacement=True,
                          generator=g).view(n_users, length)
    # open carts: +1 per add, -1 per remove, decaying over time
    score = torch.zeros(n_users)
    labels = torch.zeros(n_users, length)
    for t in range(length):
        score = 0.8 * score + (x[:, t] == 2).float() - 1.2 * (x[:, t] == 3).float() + 0.3 * (x[:, t] == 4).float()
        p = torch.sigmoid(2.0 * score - 1.5)
        labels[:, t] = (torch.rand(n_users, generator=g) < p).float()
    return x, labels  # labels[:, t] = does the user buy right after behaviour t


class NextAction(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(N_BEHAVIOURS, 16)
        self.rnn = rnnrec_fast.RNN(16, hidden, num_layers=1, nonlinearity="tanh", batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.rnn(self.emb(x))
        return self.out(y).squeeze(-1)  # logits; sigmoid gives P(buy next)


def run(seed: int = 0, epochs: int = 30, n_users: int = 512, length: int = 20, verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    x, yb = make_data(n_users, length, seed)
    xt, yt = make_data(256, length, seed + 1)
    model = NextAction()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for epoch in range(epochs):
        for i in range(0, n_users, 64):
            loss = F.binary_cross_entropy_with_logits(model(x[i:i + 64]), yb[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
        if verbose and (epoch % 10 == 0 or epoch == epochs - 1):
            print(f"epoch {epoch + 1:3d}  train BCE {losses[-1]:.4f}")
    with torch.no_grad():
        logits = model(xt)
        test_bce = float(F.binary_cross_entropy_with_logits(logits, yt))
        acc = float(((logits > 0).float() == yt).float().mean())
    rate = float(yb.mean())  # trivial baseline: always predict the training buy rate
    base_bce = float(F.binary_cross_entropy(torch.full_like(yt, rate), yt))
    base_acc = float(max(yt.mean(), 1 - yt.mean()))
    res = dict(first_loss=losses[0], last_loss=losses[-1], test_bce=test_bce, baseline_bce=base_bce,
               accuracy=acc, baseline_accuracy=base_acc)
    if verbose:
        print(f"test BCE {test_bce:.4f} (constant-rate baseline {base_bce:.4f}); "
              f"accuracy {acc:.3f} (majority baseline {base_acc:.3f})")
    return res


if __name__ == "__main__":
    run()
