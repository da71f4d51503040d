"""The GRU4Rec model on rnnrec_fast's fused GRU."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import rnnrec_fast

from ..modules import InputError, _calls_observed, _is_compiling, _unrecorded
from .data import ItemMap, RecsysError

try:  # x W^T + b for a few float32 rows in one pass over W (the catalogue); ATen's addmm otherwise
    from .._C import linear_rows as _linear_rows
except Exception:  # not built, or failed to load (as rnnrec_fast.ops)
    _linear_rows = None


def _untraced(t) -> bool:
    """Nothing records or transforms a call on t (modules._unrecorded, and no torch.compile / export
    or function mode but torch's DeviceContext): only then may linear_rows, which is not a registered
    op, run instead of ATen's addmm, which they all see."""
    return not torch.compiler.is_compiling() and not _calls_observed() and _unrecorded(t)


def _uniform_(t: torch.Tensor, fan_a: int, fan_b: int) -> torch.Tensor:
    """GRU4Rec's initialisation: U(-s, s) with s = sqrt(6 / (fan_a + fan_b))."""
    s = math.sqrt(6.0 / float(fan_a + fan_b))
    with torch.no_grad():
        return t.uniform_(-s, s)


def parse_embedding(value) -> str | int:
    """'shared' (output matrix = input embedding), a positive int (separate embedding of that size),
    or 0 / 'none' / None (one-hot input)."""
    if value is None:
        return 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("shared", "constrained"):
            return "shared"
        if v in ("none", "onehot", "one-hot", "0", ""):
            return 0
        try:
            value = int(v)
        except ValueError:
            raise RecsysError(f"bad embedding {value!r}: use 'shared', a positive size, or 'none'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecsysError(f"bad embedding {value!r}: use 'shared', a positive size, or 'none'")
    return value


def _dropout_carried(y: torch.Tensor, h_n: torch.Tensor, p: float, carry: bool):
    """Dropout at rate p on a layer's outputs y (T, B, H); with ``carry``, its h_n (B, H) (the last
    step's output) gets the last step's mask too: the state carried on is the dropped-out output."""
    if not carry:
        return F.dropout(y, p, training=True), h_n
    keep = 1.0 - p
    mask = torch.empty_like(y).bernoulli_(keep).div_(keep)
    return y * mask, h_n * mask[-1]


def check_layers(layers) -> list[int]:
    """The GRU layer sizes (an int, or a list or tuple of them) as a list, or a RecsysError saying why
    not: TrainConfig.validate() asks before any data is loaded, the model again when it is built."""
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in layers):
        raise RecsysError(f"bad layers {layers}: sizes must be integers")
    layers = [int(x) for x in layers]
    if not layers or any(x < 1 for x in layers):
        raise RecsysError(f"bad layers {layers}: need one or more positive sizes")
    if len(set(layers)) != 1:
        raise RecsysError(f"bad layers {layers}: all GRU layers must have the same size")
    return layers


class GRU4Rec(nn.Module):
    """Session-based recommender (Hidasi et al. 2016; Hidasi & Karatzoglou 2018).

    Args:
        n_items: catalogue size.
        layers: GRU layer sizes (all equal), e.g. ``[100]``.
        embedding: ``"shared"`` (the output item matrix doubles as the input embedding, GRU4Rec's
            constrained embedding), a size N (a separate input embedding), or 0 (one-hot input: the
            first layer's input weights are a per-item (3H) row, looked up instead of multiplied).
        dropout_embed, dropout_hidden: dropout on the input embedding / on each GRU layer's output.
            As in GRU4Rec, with one-hot input (``embedding=0``) the first layer is the embedding:
            ``dropout_embed`` applies to its output, ``dropout_hidden`` to the layers above it (and
            to none with a single layer). ``top_dropout`` is the rate on the top layer's output.
        reset_after: GRU candidate form (True: PyTorch/cuDNN; False: Cho et al., the original GRU4Rec).
        item_ids: original item ids, index -> id (defaults to 0..n_items-1).
    """

    # rnnrec_fast.to_torch refuses a model holding one: its code calls the recurrent layers with
    # what rnnrec_fast's modules alone take (resets; reset_after, the backend read from them)
    _keeps_rnnrec_fast_modules = True

    def __init__(self, n_items: int, layers=(100,), embedding="shared", dropout_embed: float = 0.0,
                 dropout_hidden: float = 0.0, reset_after: bool = True, item_ids=None,
                 backend: str = "auto"):
        super().__init__()
        self.train_state = None  # what train() leaves to go on from (see train's docstring)
        layers = check_layers(layers)
        if isinstance(n_items, bool) or not isinstance(n_items, numbers.Integral):
            raise RecsysError(f"bad n_items {n_items!r}: the catalogue size must be an integer")
        if n_items < 1:
            raise RecsysError("the model needs at least one item")
        for name, p in (("dropout_embed", dropout_embed), ("dropout_hidden", dropout_hidden)):
            if isinstance(p, bool) or not isinstance(p, numbers.Real):
                raise RecsysError(f"bad {name} {p!r}: must be a number in [0, 1)")
            if not 0.0 <= p < 1.0:
                raise RecsysError(f"bad {name} {p}: must be in [0, 1)")
        self.n_items = int(n_items)
        self.hidden_size = H = layers[0]
        self.num_layers = L = len(layers)
        self.embedding = parse_embedding(embedding)
        self.dropout_embed = float(dropout_embed)
        self.dropout_hidden = float(dropout_hidden)
        self.reset_after = bool(reset_after)
        self.backend = backend
        if item_ids is None:
            item_ids = list(range(n_items))
        if len(item_ids) != n_items:
            raise RecsysError(f"item_ids has {len(item_ids)} entries but n_items is {n_items}")
        self.set_item_map(ItemMap(item_ids))

        self.Wy = nn.Parameter(torch.empty(n_items, H))  # output item matrix
        self.By = nn.Parameter(torch.zeros(n_items, 1))  # output item bias
        if self.embedding == "shared":
            n_in = H
        elif self.embedding:
            self.E = nn.Parameter(torch.empty(n_items, self.embedding))
            n_in = self.embedding
        else:
            # one-hot input: layer 0's input weights as one (3H,) row per item
            self.W0 = nn.Parameter(torch.empty(n_items, 3 * H))
            self.w_hh0 = nn.Parameter(torch.empty(3 * H, H))
            self.b_ih0 = nn.Parameter(torch.zeros(3 * H))
            self.b_hh0 = nn.Parameter(torch.zeros(3 * H))
            self.register_buffer("eye0", torch.eye(3 * H), persistent=False)
            n_in = H
        n_rnn = L if self.embedding else L - 1
        self.rnn = None
        if n_rnn > 0:
            self.rnn = rnnrec_fast.GRU(n_in, H, num_layers=n_rnn, dropout=self.dropout_hidden if n_rnn > 1 else 0.0,
                                       reset_after=self.reset_after, backend=backend)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def set_item_map(self, item_map: ItemMap):
        self.item_map = item_map
        self.item_ids = item_map.item_ids
        self.item_index = item_map.item_index

    CONFIG_KEYS = ("n_items", "layers", "embedding", "dropout_embed", "dropout_hidden", "reset_after")

    def config(self) -> dict:
        return dict(n_items=self.n_items, layers=[self.hidden_size] * self.num_layers,
                    embedding=self.embedding, dropout_embed=self.dropout_embed,
                    dropout_hidden=self.dropout_hidden, reset_after=self.reset_after)

    def extra_repr(self) -> str:
        emb = {"shared": "shared", 0: "one-hot"}.get(self.embedding, self.embedding)
        return (f"n_items={self.n_items}, layers={[self.hidden_size] * self.num_layers}, embedding={emb}, "
                f"dropout_embed={self.dropout_embed}, dropout_hidden={self.dropout_hidden}, "
                f"reset_after={self.reset_after}")

    @property
    def item_params(self) -> list[nn.Parameter]:
        """Parameters indexed by item (updated row-wise; sparse gradients when training)."""
        ps = [self.Wy, self.By]
        if self.embedding != "shared":
            ps.append(self.E if self.embedding else self.W0)
        return ps

    def reset_parameters(self):
        N, H = self.n_items, self.hidden_size
        _uniform_(self.Wy, N, H)
        nn.init.zeros_(self.By)
        if self.embedding == "shared":
            n_in = H
        elif self.embedding:
            _uniform_(self.E, N, self.embedding)
            n_in = self.embedding
        else:
            for g in range(3):
                _uniform_(self.W0.data[:, g * H:(g + 1) * H], N, H)
                _uniform_(self.w_hh0.data[g * H:(g + 1) * H], H, H)
            nn.init.zeros_(self.b_ih0)
            nn.init.zeros_(self.b_hh0)
            n_in = H
        if self.rnn is not None:
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias"):
                    nn.init.zeros_(p)
                    continue
                fan_in = p.shape[1]
                for g in range(3):  # per gate block, as GRU4Rec does
                    _uniform_(p.data[g * H:(g + 1) * H], fan_in, H)

    # ------------------------------------------------------------------------------------------
    def item_rows(self, idx: torch.Tensor, sparse: bool = False):
        """Output matrix rows and biases of items ``idx`` (any shape) -> (..., H), (...)."""
        w = F.embedding(idx, self.Wy, sparse=sparse)
        b = F.embedding(idx, self.By, sparse=sparse).squeeze(-1)
        return w, b

    @property
    def input_weight(self) -> nn.Parameter:
        """The matrix whose rows are the items' input vectors: Wy (shared), E, or W0 (one-hot)."""
        if self.embedding == "shared":
            return self.Wy
        return self.E if self.embedding else self.W0

    def embed(self, items: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """Input vectors of ``items`` (T, B) -> (T, B, E)."""
        return F.embedding(items, self.input_weight, sparse=sparse)

    def recur(self, x: torch.Tensor, h: torch.Tensor, resets: torch.Tensor | None = None, dropout=None,
              carry_dropped: bool = False):
        """Run the GRU stack over the embedded inputs x (T, B, E) from h (L, B, H).
        Returns (top-layer outputs (T, B, H), h_n (L, B, H)). Dropout between layers when training
        (``dropout``: None) or where ``dropout`` is True; never where it is False, whatever the mode.
        With ``carry_dropped``, a lower layer's h_n is its last output as dropped out on its way up
        (GRU4Rec carries the dropped-out output as the state); the top layer's is never dropped here."""
        drop = self.training if dropout is None else bool(dropout)
        if self.embedding:
            if drop and self.dropout_embed > 0:
                x = F.dropout(x, self.dropout_embed, training=True)
            return self._stack(x, h, resets, drop, carry_dropped)
        # one-hot input: layer 0 is GRU4Rec's GRU embedding, its output dropped out by dropout_embed
        # (h whole checked here: the op reads h[0] alone, and with one layer nothing else reads h)
        if h.dim() != 3 or tuple(h.shape) != (self.num_layers, x.shape[1], self.hidden_size):
            raise InputError(f"GRU4Rec: Expected hidden size {(self.num_layers, x.shape[1], self.hidden_size)}, "
                             f"got {tuple(h.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:  # (no steps or no rows: what the modules give; the op refuses it)
            y0, h0n = h.new_zeros(x.shape[0], x.shape[1], h.shape[2]), h[0].clone()
        else:
            y0, h0n = rnnrec_fast.ops.recurrence(x, h[0], self.eye0, self.w_hh0, self.b_ih0, self.b_hh0,
                                                 resets=resets, mode="gru", reset_after=self.reset_after,
                                                 backend=self.backend)
        if self.rnn is None:  # the top layer: its dropout (top_dropout) is the caller's
            return y0, h0n.unsqueeze(0)
        if drop and self.dropout_embed > 0:
            y0, h0n = _dropout_carried(y0, h0n, self.dropout_embed, carry_dropped)
        y, hn = self._stack(y0, h[1:], resets, drop, carry_dropped)
        return y, torch.cat([h0n.unsqueeze(0), hn], 0)

    def _stack(self, x, h, resets, drop, carry_dropped=False):
        """self.rnn over x from h, with its dropout between layers where ``drop`` is True and never
        where it is False, decided here once: the module's mode is not read again (another thread
        may switch the model between train() and eval() during the call)."""
        rnn = self.rnn
        if rnn.dropout == 0 or rnn.num_layers == 1:  # no dropout between its layers in any mode
            # without resets, a positional call: the module's inference fast path takes it
            return rnn(x, h) if resets is None else rnn(x, h, resets=resets)
        # (not while dynamo traces: it cannot trace the C++ plan, as the modules' forward knows; with
        # hidden dropout on 2+ layers a compiled GRU4Rec broke its graph here, fullgraph=True and a
        # strict export failed; a review)
        if not drop and resets is None and not _is_compiling() and not _calls_observed():
            plan = rnn.__dict__.get("_plan")  # the module's inference fast path, without its mode check
            out = None if plan is None else plan(x, h)  # (None: declined; with autograd on, the op calls from C++)
            if out is not None:
                return out
        # layer by layer on the op, with this call's dropout; with carry_dropped, a lower layer's
        # state is its dropped-out output
        hs = []
        for layer, names in enumerate(rnn._all_weights):
            x, hl = rnnrec_fast.ops.recurrence(x, h[layer], *(getattr(rnn, n) for n in names), resets=resets,
                                               mode="gru", reset_after=rnn.reset_after, backend=rnn.backend)
            if drop and layer < rnn.num_layers - 1:
                x, hl = _dropout_carried(x, hl, rnn.dropout, carry_dropped)
            hs.append(hl)
        return x, torch.stack(hs)

    def forward(self, items: torch.Tensor, h: torch.Tensor | None = None, resets=None, sparse=False):
        """items (T, B) -> (top outputs (T, B, H) with output dropout when training, h_n (L, B, H))."""
        if h is None:
            h = self.init_state(items.shape[1])
        y, hn = self.recur(self.embed(items, sparse=sparse), h, resets)
        if self.training and self.top_dropout > 0:
            y = F.dropout(y, self.top_dropout, training=True)
        return y, hn

    @property
    def top_dropout(self) -> float:
        """Dropout rate on the top layer's output: dropout_hidden, or dropout_embed where the only
        layer is the one-hot input's GRU embedding (as in GRU4Rec)."""
        return self.dropout_embed if not self.embedding and self.rnn is None else self.dropout_hidden

    # ------------------------------------------------------------------------------------------
    # inference interface (serving)
    def init_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(self.num_layers, batch, self.hidden_size, device=self.Wy.device,
                           dtype=self.Wy.dtype)

    @torch.no_grad()
    def step(self, items: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One click per row: items (B,) int64, h (L, B, H) -> new state (L, B, H). No dropout.
        Item indices of another dtype than an integer one (float, bool) are a TypeError (a cast
        would truncate 1.7 to item 1, True to item 1, silently)."""
        items = torch.as_tensor(items, device=self.Wy.device)
        if items.numel():  # (an empty list is a float tensor: no indices to check)
            if items.dtype == torch.bool or items.is_floating_point() or items.is_complex():
                raise TypeError(f"items must be integer item indices, got dtype {items.dtype}")
            lo, hi = (int(v) for v in torch.aminmax(items))  # (the embedding says "index out of range in self")
            if lo < 0 or hi >= self.n_items:
                raise IndexError(f"item index {lo if lo < 0 else hi} out of range: the catalogue has "
                                 f"{self.n_items} items (indices 0..{self.n_items - 1}; map item ids with "
                                 "model.item_map.index)")
        items = items.to(torch.long).reshape(1, -1)
        # (a model in training mode stays in it: no mode switch, which other threads would see)
        return self.recur(self.embed(items), h, dropout=False)[1]

    @torch.no_grad()
    def score(self, h_top: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each row: h_top (B, H) -> (B, n_items)."""
        if _linear_rows is not None and _untraced(h_top):
            # it takes ATen's addmm itself but for a few float32 CPU rows (a click: 38 -> 23 us at
            # 2,933 items)
            return _linear_rows(h_top, self.Wy, self.By.view(-1))
        return torch.addmm(self.By.t(), h_top, self.Wy.t())

    @torch.no_grad()
    def topk(self, h_top: torch.Tensor, k: int = 20, block_elems: int = 1 << 24, exclude=None):
        """Top-k items per row (values, indices), scoring in blocks to bound memory; ``k`` an int
        >= 1 (more than the catalogue gives all of it), ``block_elems`` a positive int."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RecsysError(f"k must be an int >= 1, got {k!r}")
        if isinstance(block_elems, bool) or not isinstance(block_elems, (int, np.integer)) or block_elems < 1:
            raise RecsysError(f"block_elems must be an int >= 1, got {block_elems!r}")
        B = h_top.shape[0]
        k = min(int(k), self.n_items)
        rows = max(1, block_elems // self.n_items)
        if rows >= B:
            s = self.score(h_top)
            if exclude is not None:
                s.scatter_(1, exclude, float("-inf"))
            return s.topk(k, dim=1)
        vals, idxs = [], []
        for r in range(0, B, rows):
            s = self.score(h_top[r:r + rows])
            if exclude is not None:
                s.scatter_(1, exclude[r:r + rows], float("-inf"))
            v, i = s.topk(k, dim=1)
            vals.append(v)
            idxs.append(i)
        return torch.cat(vals), torch.cat(idxs)

    @torch.no_grad()
    def recommend(self, items, k: int = 20, exclude_seen: bool = False):
        """Top-k (original id, score) after the click sequence ``items`` (original ids: a list, a
        NumPy array or a tensor of them); ``k`` in [1, n_items] (more gives all items).
        ``exclude_seen``: leave the sequence's own items out (as serving's click does)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RecsysError(f"k must be an int >= 1, got {k!r}")
        if isinstance(items, torch.Tensor):
            items = items.tolist()
        if isinstance(items, (str, bytes, int, np.integer)) or not hasattr(items, "__iter__"):
            raise RecsysError(f"items must be a sequence of item ids (the session's clicks in order), got "
                              f"{type(items).__name__} {items!r}")
        idx = torch.as_tensor(self.item_map.index(items), device=self.Wy.device)
        if len(idx) == 0:
            raise RecsysError("give at least one item")
        if not isinstance(exclude_seen, bool):
            raise RecsysError(f"exclude_seen must be True or False, got {exclude_seen!r}")
        h = self.init_state(1)
        for i in idx:
            h = self.step(i.view(1), h)
        exclude = idx.unique().view(1, -1) if exclude_seen else None
        k = min(k, self.n_items - (0 if exclude is None else exclude.shape[1]))
        if k == 0:  # every item was clicked
            return []
        v, ix = self.topk(h[-1], k, exclude=exclude)
        return [(self.item_ids[j], float(s)) for j, s in zip(ix[0].tolist(), v[0].tolist())]
