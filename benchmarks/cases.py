"""The benchmark cases shared by the pytest-benchmark suite and `make bench` (benchmarks/run.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # GRU, RNN, GRUCell, RNNCell
    B: int
    T: int  # 1 for cells
    H: int
    train: bool = False
    target: float | None = None  # issue 3: median ratio torch.nn / ours
    layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # a PackedSequence of B sessions of lengths drawn in 1..T (lengths())
    x_grad: bool = True  # training: whether the input requires a gradient (False: data, e.g. features)
    weights_grad: bool = True  # training: whether the weights do (False: a frozen recurrent layer)

    def lengths(self):
        """The packed cases' session lengths: uniform in 1..T (one of length T), a fixed draw."""
        import torch
        lengths = torch.randint(1, self.T + 1, (self.B,), generator=torch.Generator().manual_seed(2))
        lengths[0] = self.T
        return lengths

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of the GEMM work (input = hidden size; a layer above a bidirectional one
        takes both directions' outputs); training counts forward + backward as 3x the forward (the
        backward does the input-gradient and the weight-gradient products), less the products
        neither side does: h0's gradient (the first step's carry of the recurrent gradient, one
        step's product per layer and direction: h0 requires none in every case), the first layer's
        input gradient where x requires none, and the weight gradients where the weights are frozen.
        The packed cases count the steps the sessions have, not the padded T of each."""
        gates = 3 if self.kind.startswith("GRU") else 1
        D = 2 if self.bidirectional else 1
        steps = float(self.lengths().sum()) / self.B if self.packed else float(self.T)  # a row's mean
        fwd = carry0 = 0.0
        for layer in range(self.layers):
            inputs = self.H if layer == 0 else D * self.H
            fwd += D * 2.0 * gates * self.H * (inputs + self.H) * self.B * steps
            carry0 += D * 2.0 * gates * self.H * self.H * self.B  # (every row has a first step)
        if not self.train:
            return fwd
        skipped = carry0
        if not self.x_grad:
            skipped += D * 2.0 * gates * self.H * self.H * self.B * steps
        if not self.weights_grad:  # (each weight's gradient one product the size of its forward's)
            skipped += fwd
        return 3 * fwd - skipped


CASES = [
    Case("GRU inference, serving step", "GRU", 1, 1, 100, target=10),
    Case("RNN inference, serving step", "RNN", 1, 1, 100, target=10),
    Case("GRUCell inference", "GRUCell", 1, 1, 100, target=5),
    Case("RNNCell inference", "RNNCell", 1, 1, 100),
    Case("GRU inference, one long session", "GRU", 1, 20, 512, target=3),
    Case("GRU inference, batch of sessions, one step", "GRU", 256, 1, 100, target=1.5),
    Case("GRU inference, large batch", "GRU", 512, 20, 256, target=1.0),
    Case("GRU training, B32 T20 H100", "GRU", 32, 20, 100, train=True, target=3),
    Case("GRU training, B64 T20 H512", "GRU", 64, 20, 512, train=True, target=1.2),
    Case("RNN training, B32 T20 H100", "RNN", 32, 20, 100, train=True),
    # an input that is data (features, one-hot rows): no input gradient; and session-parallel
    # training's step (GRU4Rec: one click of B sessions, from a detached state)
    Case("GRU training, B32 T20 H100, x without grad", "GRU", 32, 20, 100, train=True, x_grad=False),
    Case("GRU training, one step, B32 H100", "GRU", 32, 1, 100, train=True),
    # a frozen recurrent layer under trained inputs (fine-tuning what feeds it): x's gradient only
    Case("GRU training, B32 T20 H100, frozen weights", "GRU", 32, 20, 100, train=True, weights_grad=False),
    # the same kernels under deeper and bidirectional models (one op call per layer and direction)
    Case("GRU inference, serving step, 2 layers", "GRU", 1, 1, 100, layers=2),
    Case("GRU inference, 2 layers bidirectional", "GRU", 32, 20, 100, layers=2, bidirectional=True),
    Case("GRU training, 2 layers bidirectional", "GRU", 32, 20, 100, train=True, layers=2, bidirectional=True),
    # sessions of different lengths as a PackedSequence (pack_padded_sequence, enforce_sorted=False)
    Case("GRU inference, packed sessions of 1-20 clicks", "GRU", 32, 20, 100, packed=True),
    Case("GRU training, packed sessions of 1-20 clicks", "GRU", 32, 20, 100, train=True, packed=True),
    Case("GRU training, packed sessions, bidirectional", "GRU", 32, 20, 100, train=True, packed=True,
         bidirectional=True),
]

# issue 4: the Numba CPU backend beside torch.nn and the C++ backend
NUMBA_CASES = [Case(f"numba grid GRU B{B} T{T} H{H}", "GRU", B, T, H) for B in (1, 64) for T in (1, 20)
               for H in (100, 512)]
