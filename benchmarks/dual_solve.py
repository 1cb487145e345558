"""The CMT dual's cost by buffer size: does a larger step's dual cost only proportionally more?

``cmt.step_scale`` multiplies the buffer (4,000 samples for the peptide presets) by up to 16, and
the dual (:func:`~cmt_openmm.training.dual.solve_dual`, nested Brent solves on the CPU whatever
the training device) is the part of a step that does not move to a GPU. This times it on
buffers with both constraints active (λ > 0 and η > 0: the nested case, the early part of every
peptide run) at each size, and gives its microseconds per sample as a ratio against the
smallest buffer's, measured in the same run: 1 means linear cost.

The buffer: samples of a standard normal flow in ``--dim`` dimensions (120: ala4's flow),
judged by a narrower, shifted normal target, so that one step can neither reach the target
(trust region active) nor lose its entropy at once (entropy constraint active); 1 % of the
energies fail (−inf), as clashes do. Prints a table and writes JSON::

    .ci/with-env python -m benchmarks.dual_solve --out benchmarks/results/dual_solve.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cmt_openmm.training.dual import solve_dual

EPS_TR, EPS_ENT = 0.5, 0.5  # the peptide presets' trust region and warm-up entropy budget (nats)


def buffer(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """log q (n,) of standard-normal samples in ``dim`` dimensions and log p̃ (n,) of a normal
    target with scale 0.5 and mean 0.3 per coordinate; 1 % of log p̃ set to −inf."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    log_q = -0.5 * np.sum(x**2, axis=1) - 0.5 * dim * np.log(2 * np.pi)
    log_p = -0.5 * np.sum(((x - 0.3) / 0.5) ** 2, axis=1)
    log_p[rng.random(n) < 0.01] = -np.inf
    return log_q, log_p


def time_dual(n: int, dim: int, repeats: int) -> dict:
    """Fastest of ``repeats`` solves on one buffer of ``n`` samples, with the solution's multipliers."""
    log_q, log_p = buffer(n, dim)
    solve_dual(log_q, log_p, EPS_TR, EPS_ENT)  # warm-up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        sol = solve_dual(log_q, log_p, EPS_TR, EPS_ENT)
        seconds.append(time.perf_counter() - t)
    best = min(seconds)
    return {"n_samples": n, "dim": dim, "seconds": best, "us_per_sample": 1e6 * best / n, "lam": sol.lam,
            "eta": sol.eta}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[4_000, 16_000, 64_000],
                   help="buffer sizes; the first is the baseline (the step scales 1, 4, 16 of the peptide presets)")
    p.add_argument("--dim", type=int, default=120, help="flow coordinates (ala4: 120)")
    p.add_argument("--repeats", type=int, default=5, help="timed solves per size (the fastest is kept)")
    p.add_argument("--out", default="benchmarks/results/dual_solve.json")
    args = p.parse_args(argv)
    if min(args.sizes) < 1 or args.dim < 1 or args.repeats < 1:
        p.error("--sizes, --dim and --repeats must be positive integers.")
    rows = [time_dual(n, args.dim, args.repeats) for n in args.sizes]
    for row in rows:
        row["per_sample_vs_first"] = row["us_per_sample"] / rows[0]["us_per_sample"]
    print(f"{'samples':>8} {'dual s':>8} {'µs/sample':>10} {'vs first':>9} {'λ':>10} {'η':>8}")
    for r in rows:
        print(f"{r['n_samples']:>8,} {r['seconds']:>8.4f} {r['us_per_sample']:>10.2f} {r['per_sample_vs_first']:>8.2f}x "
              f"{r['lam']:>10.4g} {r['eta']:>8.4g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "eps_tr": EPS_TR, "eps_ent": EPS_ENT, "repeats": args.repeats}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
