"""Session-parallel training of GRU4Rec with sampled losses.

Each optimiser step covers one chunk of ``chunk_steps`` session-parallel steps of ``batch_size``
lanes, run through the GRU stack in one fused call (the ``resets`` mask zeroes a lane's state where
a new session starts). The loss of every step is GRU4Rec's: the lanes' outputs are scored against
that step's in-batch targets plus ``n_sample`` shared negatives drawn from support^sample_alpha
(one draw per chunk), and for cross-entropy the scores get the logQ correction
``- logq * log(Q(item))``.
"""
from __future__ import annotations

import copy
import functools
import math
import sys
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .batching import session_parallel_schedule
from .checkpoint import check_device
from .data import RecsysError, SessionDataset
from .losses import LOSSES, bpr_max, cross_entropy, top1_max
from .model import GRU4Rec, check_layers, parse_embedding
from .optim import AdagradM


_INT_MAX = 2 ** 63 - 1  # the integer options' bound (int64)
_FLOAT_MAX = float(np.finfo(np.float32).max)  # the float options' bound: they meet float32 tensors


@dataclass
class TrainConfig:
    loss: str = "cross-entropy"
    layers: list = field(default_factory=lambda: [100])
    batch_size: int = 32
    n_sample: int = 2048
    sample_alpha: float = 0.5
    logq: float = 1.0
    epochs: int = 10
    lr: float = 0.2
    momentum: float | None = None  # AdagradM's (the other optimizers take none); None: 0.2
    dropout_hidden: float = 0.4
    dropout_embed: float = 0.0
    embedding: object = "shared"
    bpreg: float = 0.0
    elu_param: float = 0.0
    reset_after: bool = True
    chunk_steps: int = 4
    optimizer: str = "adagradm"
    seed: int | None = None
    device: str = "cpu"
    sample_cache: int = 1 << 20
    loss_norm: str = "step"
    state_dropout: bool = True
    threads: int | None = 1
    gemm_threads: int | None = None

    def validate(self):
        if self.loss not in LOSSES:
            raise RecsysError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        for name in ("batch_size", "n_sample", "epochs", "chunk_steps", "sample_cache"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise RecsysError(f"{name} must be an integer, got {v!r}")
            if v > _INT_MAX:  # (a batch size of 1e20 overflowed in the loss's normalisation)
                raise RecsysError(f"{name} must be at most 2**63 - 1, got {v!r}")
        for name in ("threads", "gemm_threads"):  # (None: torch's own thread count)
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise RecsysError(f"{name} must be an integer or None, got {v!r}")
        for name in ("sample_alpha", "logq", "lr", "momentum", "bpreg", "elu_param", "dropout_hidden",
                     "dropout_embed"):
            v = getattr(self, name)
            if name == "momentum" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise RecsysError(f"{name} must be a finite number, got {v!r}")
            if abs(v) > _FLOAT_MAX:  # (an ELU alpha of 1e300: torch's "cannot be converted to type float")
                raise RecsysError(f"{name} must be within float32's range (at most {_FLOAT_MAX:.4g}), got {v!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not -(2 ** 63) <= seed <= 2 ** 64 - 2):
            # (torch's seeds span [-2**63, 2**64 - 1]; the sampler's generator takes seed + 1)
            raise RecsysError(f"seed must be an integer from -2**63 to 2**64 - 2, got {seed!r}")
        if self.loss_norm not in ("step", "batch"):
            raise RecsysError(f"unknown loss_norm {self.loss_norm!r}; choose step or batch")
        checks = [
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.n_sample >= 0, "n_sample must be >= 0"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.lr > 0, "learning rate must be > 0"),
            (self.momentum is None or self.momentum >= 0, "momentum must be >= 0"),
            (0 <= self.dropout_hidden < 1, "dropout_hidden must be in [0, 1)"),
            (0 <= self.dropout_embed < 1, "dropout_embed must be in [0, 1)"),
            (self.chunk_steps >= 1, "chunk_steps must be >= 1"),
            (self.logq >= 0, "logq must be >= 0"),
            (self.sample_alpha >= 0, "sample_alpha must be >= 0"),
            (self.bpreg >= 0, "bpreg must be >= 0"),
            (self.elu_param >= 0, "elu_param must be >= 0"),
            (self.sample_cache >= 1, "sample_cache must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.gemm_threads is None or self.gemm_threads >= 1, "gemm_threads must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RecsysError(msg)
        if self.batch_size == 1 and self.n_sample == 0:
            raise RecsysError(_NO_NEGATIVES)
        check_layers(self.layers)
        self.embedding = parse_embedding(self.embedding)
        check_device(self.device)
        if self.optimizer not in ("adagradm", "adam", "adagrad", "sgd"):
            raise RecsysError(f"unknown optimizer {self.optimizer!r}")
        # options the chosen loss or optimizer would ignore, silently (from a review)
        if self.bpreg and not option_applies("bpreg", self.loss, self.optimizer):
            raise RecsysError(f"bpreg applies to loss bpr-max only (the loss is {self.loss})")
        if self.elu_param and not option_applies("elu_param", self.loss, self.optimizer):
            raise RecsysError("elu_param applies to losses bpr-max and top1-max only (the loss is cross-entropy)")
        if self.momentum is not None and not option_applies("momentum", self.loss, self.optimizer):
            raise RecsysError(f"momentum applies to optimizer adagradm only (the optimizer is {self.optimizer})")
        return self


def option_applies(name, loss, optimizer) -> bool:
    """Whether the training option ``name`` (momentum, bpreg, elu_param or logq) plays a part with
    this loss and optimizer (TrainConfig refuses the first three set for the others; logq is left
    alone by the other losses)."""
    return {"momentum": optimizer == "adagradm", "bpreg": loss == "bpr-max", "elu_param": loss != "cross-entropy",
            "logq": loss == "cross-entropy"}[name]


_NO_NEGATIVES = ("no negative examples: with n_sample=0 the negatives are the other sessions of the batch, "
                 "and batch size 1 (or a single training session) leaves none")


class Progress:
    """Plain stderr progress line: epoch, %, running loss, events/s."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None, interval: float = 0.5):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int, loss: float):
        self.done += n
        now = time.perf_counter()
        if self.enabled and self.tty and now - self.last >= self.interval:
            self.last = now
            self._write(loss, end="\r")

    def close(self, loss: float):
        if self.enabled:
            self._write(loss, end="\n")

    def _write(self, loss, end):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pct = 100.0 * self.done / max(self.total, 1)
        self.stream.write(f"{self.desc} {pct:5.1f}% | loss {loss:.4f} | {self.done / dt:,.0f} events/s"
                          f" | {dt:.1f}s{end}")
        self.stream.flush()


class NegativeSampler:
    """Items drawn with probability proportional to support^alpha, from a pre-drawn cache."""

    def __init__(self, support: np.ndarray, n_sample: int, alpha: float, generator: torch.Generator,
                 cache_size: int = 10_000_000, device="cpu"):
        s = np.asarray(support, dtype=np.float64)
        if alpha == 0:
            p = np.ones_like(s)
        else:  # support^alpha / max^alpha, from logs: support^alpha itself overflows (a NaN distribution
            # that sent every draw to one item) from alpha ~ 709 / ln(max support) on
            with np.errstate(divide="ignore", invalid="ignore"):
                p = np.exp(alpha * (np.log(s) - np.log(s.max())))
        total = p.sum()
        if not (np.isfinite(total) and total > 0):
            raise RecsysError(f"cannot sample negatives: no item has a positive weight support^{alpha}")
        self.cdf = torch.tensor(np.cumsum(p) / total, dtype=torch.float64, device="cpu")  # (as the generator)
        self.cdf[-1] = 1.0
        self.n_sample = n_sample
        self.gen = generator
        self.batches = max(1, cache_size // max(n_sample, 1))
        self.device = device
        self._cache = None
        self._ptr = 0
        self._refill_state = None  # the generator's state before the cache was drawn

    def _refill(self):
        self._refill_state = self.gen.get_state()
        u = torch.rand(self.batches * self.n_sample, generator=self.gen, dtype=torch.float64, device="cpu")
        idx = torch.searchsorted(self.cdf, u, right=True).clamp_(max=len(self.cdf) - 1)
        self._cache = idx.view(self.batches, self.n_sample).to(self.device)
        self._ptr = 0

    def draw(self) -> torch.Tensor:
        if self._cache is None or self._ptr >= self.batches:
            self._refill()
        s = self._cache[self._ptr]
        self._ptr += 1
        return s

    def state(self) -> dict:
        """Where the draws stand: enough for :meth:`restore` to go on with the same draws (the cache
        is drawn again from the generator's state before it, not stored)."""
        return dict(n_sample=self.n_sample, batches=self.batches, cdf=self._fingerprint(),
                    refill_gen=self._refill_state, ptr=self._ptr)

    def _fingerprint(self) -> int:
        return zlib.crc32(self.cdf.numpy().tobytes()) ^ (len(self.cdf) << 32)

    def restore(self, st: dict) -> bool:
        """Go on from :meth:`state`'s ``st`` where it describes this sampler's draws (the same sample
        size, cache and distribution), drawing the cache again; False, leaving the sampler as it
        is (its generator's state continued), where it does not."""
        if (st is None or st["refill_gen"] is None or st["n_sample"] != self.n_sample
                or st["batches"] != self.batches or st["cdf"] != self._fingerprint()):
            return False
        _set_rng(self.gen.set_state, st["refill_gen"], "sampler")
        self._refill()
        self._ptr = st["ptr"]
        return True


_GEMM_THREADS = [None]


class _gemm_threads:
    """Raise torch's intra-op threads for the big score GEMMs only (the rest of a chunk is small
    tensors that run best on one thread)."""

    def __enter__(self):
        n = _GEMM_THREADS[0]
        self.old = None
        if n and n != torch.get_num_threads():
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


class _SampledSoftmaxXE(torch.autograd.Function):
    """sum_r -log softmax(Y W^T + c)[r, r] over the valid rows, with masked columns; the softmax is
    computed in place and reused by the backward pass (one score matrix, two GEMMs back)."""

    @staticmethod
    def forward(ctx, Y, W, cb, keep, rvalid):
        R = Y.shape[0]
        with _gemm_threads():
            Z = torch.addmm(cb, Y, W.t())
        if keep is not None:
            Z[:, :keep.shape[1]].masked_fill_(~keep, float("-inf"))
        m = Z.max(1, keepdim=True).values
        Z.sub_(m)
        diag = Z.diagonal()[:R].clone()
        Z.exp_()
        s = Z.sum(1, keepdim=True)
        per = s.squeeze(1).log() - diag
        if rvalid is not None:
            per = per.masked_fill(~rvalid, 0.0)
            s = s.masked_fill(~rvalid.unsqueeze(1), float("inf"))  # invalid rows: zero gradient
        # Z holds exp(z - max); the softmax is Z / s, formed in the backward pass in one sweep
        ctx.save_for_backward(Y, W, Z, s)
        return per.sum()

    @staticmethod
    def backward(ctx, g):
        Y, W, P, s = ctx.saved_tensors
        R = Y.shape[0]
        P.mul_(g / s)  # softmax * upstream gradient
        P.diagonal()[:R].sub_(g * torch.isfinite(s.squeeze(1)))
        with _gemm_threads():
            dY = P @ W if ctx.needs_input_grad[0] else None
            dW = P.t() @ Y if ctx.needs_input_grad[1] else None
        dc = P.sum(0) if ctx.needs_input_grad[2] else None
        return dY, dW, dc, None, None


def _block_diag(T, B, device):
    """(T*B, T*B) bool mask of the rows of one step (row t*B + b is step t's): cached for the few
    chunk shapes a training run uses (a full chunk and a shorter last one), not for every shape a
    process ever trained with (one mask at T=16, B=512 is 67 MB)."""
    return _block_diag_cached(T, B, str(device))


@functools.lru_cache(maxsize=4)
def _block_diag_cached(T, B, device):
    sid = torch.arange(T * B, device=device) // B
    return sid.unsqueeze(1) == sid.unsqueeze(0)


def _live_rows(idx, weight, live):
    """``F.embedding(idx, weight, sparse=True)``, with zero rows where ``live`` (bool, idx's shape;
    None: all) is False, which the sparse gradient then does not index."""
    if live is None:
        return F.embedding(idx, weight, sparse=True)
    pos = live.nonzero().squeeze(1)
    out = weight.new_zeros(idx.shape[0], weight.shape[1])
    return out.index_copy(0, pos, F.embedding(idx[pos], weight, sparse=True))


def chunk_loss(model: GRU4Rec, inp, tgt, resets, valid, h, sample, cfg: TrainConfig, logp=None, norm_batch=None):
    """GRU4Rec's loss for one chunk of T session-parallel steps.

    Row (t, b) is lane b's output at step t; its candidates are step t's in-batch targets (the
    target of row (t, b) is its own column) plus the shared negative samples. Returns
    (loss summed over the chunk's events / batch size (``norm_batch``, default B), new state
    (L, B, H), number of events)."""
    T, B = inp.shape
    H = model.hidden_size
    TB = T * B
    cols = tgt.reshape(-1) if sample is None else torch.cat([tgt.reshape(-1), sample])
    # idle lanes (the sessions ran out) look up no item: zero rows, out of the sparse gradients,
    # whose rows the optimiser moves by their momentum even where the gradient is zero (GRU4Rec
    # drops such lanes; their item 0 here had its row moved, a review found)
    live = None if bool(valid.all()) else valid.reshape(-1)
    live_cols = None if live is None else torch.cat([live, live.new_ones(cols.shape[0] - TB)])
    if model.embedding == "shared":
        idx = torch.cat([inp.reshape(-1), cols])
        rows = _live_rows(idx, model.Wy, None if live is None else torch.cat([live, live_cols]))
        x, W = rows[:TB].view(T, B, H), rows[TB:]
    else:
        x = _live_rows(inp.reshape(-1), model.input_weight, live).view(T, B, -1)
        W = _live_rows(cols, model.Wy, live_cols)
    cb = _live_rows(cols, model.By, live_cols).squeeze(1)
    # GRU4Rec carries every layer's dropped-out output as its next state: the lower layers' here
    # (recur), the top layer's below; at the chunk boundary (exact for chunk_steps=1)
    y, hn = model.recur(x, h, resets, carry_dropped=cfg.state_dropout)
    p = model.top_dropout
    if p > 0 and cfg.state_dropout:
        keep_p = 1.0 - p
        mask = torch.empty_like(y).bernoulli_(keep_p).div_(keep_p)
        y = y * mask
        hn = torch.cat([hn[:-1], (hn[-1] * mask[-1]).unsqueeze(0)], 0)
    elif p > 0:
        y = F.dropout(y, p, training=True)
    Y = y.reshape(TB, H)
    if cfg.loss == "cross-entropy" and cfg.logq > 0 and logp is not None:
        corr = logp[tgt.reshape(-1)]
        if sample is not None:
            corr = torch.cat([corr, cfg.sample_alpha * logp[sample]])
        cb = cb - cfg.logq * corr
    S = 0 if sample is None else sample.shape[0]
    if T > 1 and TB >= _PER_STEP_MIN_ROWS and (T - 1) * B > (TB + S) // 4:
        # The chunk's score matrix would be mostly other steps' in-batch columns, masked out
        # (very large batches with few samples): score each step on its own columns instead.
        loss, m = 0.0, 0
        for t in range(T):
            r = slice(t * B, (t + 1) * B)
            Wt = W[r] if S == 0 else torch.cat([W[r], W[TB:]])
            ct = cb[r] if S == 0 else torch.cat([cb[r], cb[TB:]])
            lt, mt = _scores_loss(Y[r], Wt, ct, valid[t:t + 1], 1, B, S, cfg)
            loss, m = loss + lt, m + mt
    else:
        loss, m = _scores_loss(Y, W, cb, valid, T, B, S, cfg)
    return loss / _norm(cfg, T, B if norm_batch is None else norm_batch), hn, m


# Chunks of at least this many rows (steps x batch) score each step on its own columns where other
# steps' in-batch columns would be over a quarter of the score matrix.
_PER_STEP_MIN_ROWS = 512


def _scores_loss(Y, W, cb, valid, T, B, S, cfg):
    """The summed loss of T steps' rows Y (T*B, H) against the columns W (T*B in-batch targets,
    then S samples), a row seeing its own step's targets and the samples; and the number of events."""
    TB = T * B
    all_valid = bool(valid.all())
    keep = _block_diag(T, B, Y.device)
    vflat = valid.reshape(-1)
    if not all_valid:
        keep = keep & vflat.unsqueeze(0)
    if cfg.loss == "cross-entropy":
        loss = _SampledSoftmaxXE.apply(Y, W, cb, keep, None if all_valid else vflat)
        return loss, (TB if all_valid else int(vflat.sum()))
    logits = torch.addmm(cb, Y, W.t())
    target = torch.arange(TB, device=Y.device)
    cm = keep if S == 0 else torch.cat([keep, keep.new_ones(TB, S)], 1)
    if not all_valid:
        logits, target, cm = logits[vflat], target[vflat], cm[vflat]
    if cfg.loss == "bpr-max":
        per = bpr_max(logits, target, cm, bpreg=cfg.bpreg, elu_param=cfg.elu_param)
    else:
        per = top1_max(logits, target, cm, elu_param=cfg.elu_param)
    return per.sum(), per.shape[0]


def _norm(cfg, T, B):
    """GRU4Rec divides each step's summed loss by the batch size. ``loss_norm="step"`` also averages
    over the chunk's T steps, so one chunk's gradient has the scale of one GRU4Rec step (Adagrad's
    eps makes the update depend on that scale); ``"batch"`` sums the steps."""
    return float(B * T if cfg.loss_norm == "step" else B)


def _make_optimizer(model, cfg):
    if cfg.optimizer == "adagradm":
        return AdagradM(model.parameters(), lr=cfg.lr, momentum=0.2 if cfg.momentum is None else cfg.momentum)
    # torch optimisers: dense gradients for the item matrices
    if cfg.optimizer == "adam":
        return torch.optim.SparseAdam(model.item_params, lr=cfg.lr), torch.optim.Adam(
            [p for p in model.parameters() if all(p is not q for q in model.item_params)], lr=cfg.lr)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=cfg.lr)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)


class _Multi:
    def __init__(self, opts):
        self.opts = opts

    def step(self):
        for o in self.opts:
            o.step()


# ------------------------------------------------------------------------------------------------
# The training state a model carries from one train() call to the next (model.train_state; saved
# in checkpoints): the optimiser's accumulators and momentum and where the random streams stand, so
# that training continued gives the model one longer run would have given
# ------------------------------------------------------------------------------------------------
TRAIN_STATE_VERSION = 1
_OPT_SCRATCH = ("scratch", "seen")  # AdagradM's work buffers (all zero between steps): not state


def _optimizers(opt):
    return opt.opts if isinstance(opt, _Multi) else [opt]


# the config fields that shape the training (a continued run with others is not one longer run)
_TRAINING_FIELDS = ("loss", "batch_size", "n_sample", "sample_alpha", "logq", "lr", "momentum", "bpreg", "elu_param",
                    "chunk_steps", "optimizer", "sample_cache", "loss_norm", "state_dropout")


def _config_changes(saved, cfg) -> str:
    """The training fields of ``cfg`` that differ from the ``saved`` config (the state's), as
    'lr 0.01 (was 0.2), ...'; '' where none does or no config was saved."""
    if not isinstance(saved, dict):
        return ""
    now = asdict(cfg)
    return ", ".join(f"{k} {now[k]!r} (was {saved[k]!r})" for k in _TRAINING_FIELDS if k in saved and saved[k] != now[k])


def _train_state(cfg, opt, gen, sampler, device, epochs) -> dict:
    opt_states = []
    for o in _optimizers(opt):
        sd = o.state_dict()
        sd["state"] = {i: {k: v for k, v in st.items() if k not in _OPT_SCRATCH} for i, st in sd["state"].items()}
        opt_states.append(sd)
    # (copies: the optimiser's tensors are its own, so that a later run restoring from this state,
    # or a run it is restored into, never changes a state already handed out)
    opt_states = copy.deepcopy(opt_states)
    return dict(version=TRAIN_STATE_VERSION, optimizer=cfg.optimizer, optimizer_state=opt_states,
                config={k: v for k, v in asdict(cfg).items() if k in _TRAINING_FIELDS},
                rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                gen=gen.get_state(), sampler=None if sampler is None else sampler.state(), epochs=epochs)


def _is_rng_state(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1


def check_train_state(state) -> None:
    """RecsysError unless ``state`` has the form :func:`train` gives ``model.train_state`` (its
    tensors' sizes are checked against the model where training goes on)."""
    def bad(what):
        raise RecsysError(f"malformed training state ({what})")
    if not isinstance(state, dict):
        bad(f"a {type(state).__name__}, not a dict")
    missing = [k for k in ("version", "optimizer", "optimizer_state", "rng", "cuda_rng", "gen", "sampler", "epochs")
               if k not in state]
    if missing:
        bad(f"no {', '.join(missing)}")
    if type(state["version"]) is not int or not 1 <= state["version"] <= TRAIN_STATE_VERSION:
        bad(f"version {state['version']!r}: this code reads up to {TRAIN_STATE_VERSION}")
    if state["optimizer"] not in ("adagradm", "adam", "adagrad", "sgd"):
        bad(f"optimizer {state['optimizer']!r}")
    if not (isinstance(state["optimizer_state"], list)
            and all(isinstance(d, dict) and isinstance(d.get("state"), dict) and isinstance(d.get("param_groups"), list)
                    for d in state["optimizer_state"])):
        bad("optimizer_state must be a list of optimizer state dicts")
    if not _is_rng_state(state["rng"]) or not _is_rng_state(state["gen"]):
        bad("rng and gen must be random generator states (1-D uint8 tensors)")
    if state["cuda_rng"] is not None and not _is_rng_state(state["cuda_rng"]):
        bad("cuda_rng must be a random generator state or None")
    if type(state["epochs"]) is not int or not 0 <= state["epochs"] < 2 ** 63:
        bad(f"epochs {state['epochs']!r}")
    if state.get("config") is not None and not isinstance(state["config"], dict):
        bad("config must be a dict")
    sm = state["sampler"]
    if sm is not None:
        if not (isinstance(sm, dict) and {"n_sample", "batches", "cdf", "refill_gen", "ptr"} <= set(sm)
                and all(type(sm[k]) is int for k in ("n_sample", "batches", "cdf", "ptr"))
                and (sm["refill_gen"] is None or _is_rng_state(sm["refill_gen"]))
                and 0 <= sm["ptr"] <= sm["batches"]):
            bad("sampler")


def _set_rng(setter, state, what) -> None:
    try:
        setter(state.cpu())
    except RuntimeError as exc:  # (a state of another size)
        raise RecsysError(f"malformed training state ({what}: {exc})") from None


def _restore_optimizer(opt, saved) -> None:
    """Load the saved optimiser states into ``opt`` (made for the model from the config), keeping
    the config's hyperparameters (a learning rate changed for the continued run applies). The
    saved tensors are copied (the state handed in is never changed by the run), and every entry
    is checked first: a RecsysError for one that does not fit this model's weights."""
    opts = _optimizers(opt)
    if len(saved) != len(opts):
        raise RecsysError(f"the training state holds {len(saved)} optimizer states where this optimizer has {len(opts)}")
    for o, sd in zip(opts, saved):
        params = [p for g in o.param_groups for p in g["params"]]
        _check_optimizer_state(sd, params)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
        try:
            o.load_state_dict(copy.deepcopy(sd))
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            raise RecsysError(f"the training state does not fit this model's optimizer ({exc})") from None
        for g, f in zip(o.param_groups, fresh):
            g.update(f)


# the optimisers' state entries that hold sums of squares (never negative)
_SQUARES = ("acc", "exp_avg_sq", "sum")


def _check_optimizer_state(sd, params) -> None:
    """RecsysError unless the optimizer state dict ``sd`` fits ``params`` (in its param groups'
    order): each state entry a dict, keyed by one of its groups' indices, holding finite floating
    tensors of its weight's shape (sums of squares not negative), or a 'step' count (a number or
    a 0-dim tensor, not negative), or SGD's momentum_buffer None."""
    def bad(what):
        raise RecsysError(f"the training state does not fit this model: {what}")
    try:
        ids = [i for g in sd["param_groups"] for i in g["params"]]
    except (TypeError, KeyError):
        bad("its param_groups do not list their weights")
    if len(ids) != len(params) or len(set(ids)) != len(ids):
        bad(f"its param_groups list {len(ids)} weights where the optimizer has {len(params)}")
    where = dict(zip(ids, params))
    for i, per in sd["state"].items():
        if i not in where:
            bad(f"the optimizer's state names weight {i!r}, which its param_groups do not list")
        if not isinstance(per, dict):
            bad(f"the optimizer's state of weight {i!r} is a {type(per).__name__}, not a dict")
        p = where[i]
        for k, v in per.items():
            if k == "step":
                n = v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v
                if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 <= n < float("inf"):
                    bad(f"the optimizer's step of a weight of shape {tuple(p.shape)} is {v!r}")
            elif k == "momentum_buffer" and v is None:
                continue
            elif not isinstance(v, torch.Tensor) or not v.is_floating_point():
                bad(f"the optimizer's {k} of a weight of shape {tuple(p.shape)} is a "
                    f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}, not a floating tensor")
            elif v.shape != p.shape:
                bad(f"the optimizer's {k} of a weight of shape {tuple(p.shape)} has shape {tuple(v.shape)}")
            elif not bool(torch.isfinite(v).all()):
                bad(f"the optimizer's {k} of a weight of shape {tuple(p.shape)} is not finite")
            elif k in _SQUARES and bool((v < 0).any()):
                bad(f"the optimizer's {k} of a weight of shape {tuple(p.shape)} holds negative values")


def train(train_data: SessionDataset, cfg: TrainConfig, *, progress: bool = True,
          model: GRU4Rec | None = None) -> tuple[GRU4Rec, dict]:
    """Train GRU4Rec on ``train_data``. Returns (model in eval mode, stats dict).

    ``model`` (optional) continues training an existing model: ``train_data`` must be indexed by
    its item map, and its own architecture and dropout rates apply (``cfg``'s model fields, layers
    to dropout, are used only to build a new model). The model returned carries its training state,
    ``model.train_state`` (the optimiser's accumulators and momentum, where the random streams of
    dropout and negative sampling stand, the epochs run; :func:`save_checkpoint` saves it), and a
    model given with one goes on from it: the same config's N epochs and then M more give the model
    one run of N + M epochs gives, to the bit (``cfg.seed`` then plays no part: the streams go on
    from the state; a config with other training options, such as the learning rate, applies them
    to the continued run, with a warning naming them; the state handed in is never changed). A model given without a training state (``model.train_state = None``) or
    with another optimizer's starts the optimiser afresh, with a warning: a warm start.

    ``cfg.threads`` (default 1) sets torch's intra-op threads for the run: most per-chunk tensors are
    small and run best on one thread; the two or three big score GEMMs per chunk use
    ``cfg.gemm_threads`` (default: torch's thread count at entry, at most 4)."""
    cfg.validate()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # default: the big score GEMMs use up to 4 of torch's threads, everything else cfg.threads
    _GEMM_THREADS[0] = cfg.gemm_threads if cfg.gemm_threads else min(4, old_threads)
    try:
        return _train(train_data, cfg, progress, model)
    finally:
        _GEMM_THREADS[0] = None
        torch.set_num_threads(old_threads)


def _train(train_data, cfg, progress, model):
    if train_data.n_events <= 0:
        raise RecsysError("the training data has no session with at least two clicks")
    device = torch.device(cfg.device)
    resume = None
    if model is not None:
        model.item_map.check_same(train_data.item_map, "the training data")
        resume = getattr(model, "train_state", None)
        if resume is not None:
            check_train_state(resume)
        else:
            warnings.warn("the model carries no training state (model.train_state): training goes on from its "
                          "weights with the optimizer's state afresh (a warm start, not a resumed run)", stacklevel=3)
    gen = torch.Generator()
    if resume is None:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
            gen.manual_seed(cfg.seed + 1)
        else:
            gen.seed()
    n_items = len(train_data.item_map)
    if model is None:
        model = GRU4Rec(n_items, cfg.layers, cfg.embedding, cfg.dropout_embed, cfg.dropout_hidden,
                        cfg.reset_after, item_ids=train_data.item_map.item_ids)
    model.to(device)
    opt = _make_optimizer(model, cfg)
    if isinstance(opt, tuple):
        opt = _Multi(opt)
    if resume is not None:  # (all of the state checked before anything is set from it)
        if resume["optimizer"] == cfg.optimizer:
            _restore_optimizer(opt, resume["optimizer_state"])
        else:
            warnings.warn(f"the model's training state holds optimizer {resume['optimizer']}'s state and the config "
                          f"asks for {cfg.optimizer}: its state starts afresh", stacklevel=3)
        changed = _config_changes(resume.get("config"), cfg)
        if changed:
            warnings.warn(f"the continued run's config differs from the one its training state was trained with "
                          f"({changed}): it applies them, so the model is not what one longer run would give",
                          stacklevel=3)
        # the random streams go on where they stopped
        _set_rng(torch.set_rng_state, resume["rng"], "rng")
        if device.type == "cuda" and resume["cuda_rng"] is not None:
            _set_rng(lambda st: torch.cuda.set_rng_state(st, device), resume["cuda_rng"], "cuda_rng")
        _set_rng(gen.set_state, resume["gen"], "gen")
    model.train()
    # lanes past the number of sessions would stay idle (a state row and score rows and columns
    # each, masked out): not more; the loss is still normalised by cfg.batch_size
    lanes = min(cfg.batch_size, int(np.count_nonzero(np.diff(train_data.offsets) >= 2)))
    if lanes == 1 and cfg.n_sample == 0:
        raise RecsysError(_NO_NEGATIVES)
    sched = session_parallel_schedule(train_data.items, train_data.offsets, lanes)
    if cfg.n_sample == 0:
        # as GRU4Rec, the epoch ends where fewer than two lanes are left: a lone lane has no
        # negative (its loss and gradient zero, its rows still moved by the optimiser's momentum)
        sched = sched.until_fewer_lanes(2)
    sched = sched.to(device)
    support = train_data.support()
    sampler = None
    if cfg.n_sample > 0:
        sampler = NegativeSampler(support, cfg.n_sample, cfg.sample_alpha, gen, cfg.sample_cache, device)
        if resume is not None:
            sampler.restore(resume["sampler"])
    logp = None
    if cfg.loss == "cross-entropy" and cfg.logq > 0:
        logp = torch.tensor(np.log(np.maximum(support, 1.0)), dtype=torch.float32, device=device)
    L, B, H = model.num_layers, lanes, model.hidden_size
    losses = []
    t_start = time.perf_counter()
    c_start = time.process_time()
    for epoch in range(cfg.epochs):
        h = torch.zeros(L, B, H, device=device, dtype=model.Wy.dtype)  # (a float64 model continued)
        bar = Progress(sched.n_events, f"epoch {epoch + 1}/{cfg.epochs}", enabled=progress)
        tot, n_ev = 0.0, 0
        loss_acc = torch.zeros((), device=device)
        for inp, tgt, rst, val in sched.chunks(cfg.chunk_steps):
            sample = sampler.draw() if sampler is not None else None
            for p in model.parameters():
                p.grad = None
            loss, hn, m = chunk_loss(model, inp, tgt, rst, val, h, sample, cfg, logp, norm_batch=cfg.batch_size)
            loss.backward()
            opt.step()
            h = hn.detach()
            loss_acc += loss.detach() * _norm(cfg, inp.shape[0], cfg.batch_size)
            n_ev += m
            if bar.tty:
                bar.update(m, float(loss_acc) / max(n_ev, 1))
            else:
                bar.done += m
        tot = float(loss_acc) / max(n_ev, 1)
        if not math.isfinite(tot):
            raise RecsysError(f"training diverged (loss {tot}) in epoch {epoch + 1}; lower the learning rate")
        bar.close(tot)
        losses.append(tot)
    secs = time.perf_counter() - t_start
    cpu = time.process_time() - c_start
    model.train_state = _train_state(cfg, opt, gen, sampler, device, cfg.epochs + (resume["epochs"] if resume else 0))
    model.eval()
    events = sched.n_events * cfg.epochs
    stats = dict(train_seconds=secs, events=events, events_per_second=events / secs if secs > 0 else 0.0,
                 cpu_seconds=cpu, events_per_cpu_second=events / cpu if cpu > 0 else 0.0,
                 epoch_losses=losses, config={k: v for k, v in asdict(cfg).items()})
    return model, stats
