"""Ad hoc (not a test or a benchmark case): the coefficients of the C++ vector kernels' tanh
(csrc/rnnrec_rows.inc, v_tanh): tanh(x) = x P(x^2) / Q(x^2) on [0, C], P and Q of degree 4 in
t = x^2, Q(0) = 1, fitted to the least maximum relative error by linearised least squares
(Sanathanan-Koerner: P - f Q = 0 weighted by 1 / (f Q_prev)) with Lawson's reweighting towards the
points of largest error. t is scaled to [0, 1] while fitting, for conditioning.

    python benchmarks/adhoc_fit_tanh.py [C] [degree of P] [degree of Q]

prints the maximum relative error in exact (float64) arithmetic and the coefficients as float32
literals, lowest degree first (the kernel evaluates them by Horner's rule from the highest).
"""
import sys

import numpy as np


def fit(c=9.1, deg_p=4, deg_q=4, points=40000, rounds=400):
    x = np.unique(np.concatenate([np.linspace(0, c, points), c * np.sin(np.linspace(0, np.pi / 2, points))]))
    x = x[x > 0]
    scale = c * c
    u = x * x / scale
    f = np.tanh(x) / x
    vp = np.vander(u, deg_p + 1, increasing=True)
    vq = np.vander(u, deg_q + 1, increasing=True)
    weights, q_prev, best = np.ones_like(u), np.ones_like(u), None
    for it in range(rounds):
        a = np.concatenate([vp, -f[:, None] * vq[:, 1:]], axis=1)
        s = weights / (f * q_prev)
        sol = np.linalg.lstsq(a * s[:, None], f * s, rcond=None)[0]
        p, q = sol[: deg_p + 1], np.concatenate([[1.0], sol[deg_p + 1:]])
        q_prev = vq @ q
        err = (vp @ p / q_prev - f) / f
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, p.copy(), q.copy(), q_prev.min())
        if it >= 20:
            weights = weights * np.sqrt(np.abs(err) / worst) + 1e-30
            weights /= weights.sum()
    worst, p, q, q_min = best
    assert q_min > 0, "Q has a zero on the interval"
    unscale = scale ** -np.arange(max(deg_p, deg_q) + 1)
    return worst, p * unscale[: deg_p + 1], q * unscale[: deg_q + 1]


if __name__ == "__main__":
    args = sys.argv[1:]
    c = float(args[0]) if args else 9.1
    deg_p, deg_q = (int(args[1]), int(args[2])) if len(args) >= 3 else (4, 4)
    worst, p, q = fit(c, deg_p, deg_q)
    print(f"tanh(x) = x P(x^2) / Q(x^2) on [0, {c}]: max relative error {worst:.3e} (float64)")
    print("P:", ", ".join(f"{np.float32(v):.9e}f" for v in p))
    print("Q:", ", ".join(f"{np.float32(v):.9e}f" for v in q))
