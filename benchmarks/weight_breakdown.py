"""Where a peptide generator's importance weights go wrong: its weight variance split over
conformational states.

A generator's reverse ESS is 1 / (N Σ w̄²) (w̄ the normalised weights of N samples). This splits
Σ w̄² over states of the peptide and prints, per state: its share of the generator's samples
("raw"), its reweighted population (self-normalised, delta-method standard error), their ratio
(above 1: the generator under-samples the state), its share of Σ w̄², and the ESS within it. A
state that the generator under-samples and that carries much of Σ w̄² is where training falls
short. With fewer than 100 effective samples in all, every figure rests on a few samples: the
header says "unreliable" and the record has ``"reliable": false``. The states:

- the φ-sign patterns of the backbone (the training strata; "-+-": residue 2 at φ > 0);
- the turn hydrogen bonds (:func:`~cmt_openmm.coordinates.backbone.turn_hydrogen_bonds`): carbonyl O
  of residue i and amide H of residue i + 3 (3₁₀ turn) or i + 4 (α turn) closer than 0.25 nm
  (caps count as residues), each a state of its own (a
  helical turn can hold two, so these overlap), and "no turn" (none of them). The contact
  depends on every backbone torsion between the two residues at once, which is what a flow on
  internal coordinates finds hardest.

Prints two tables and writes JSON::

    .ci/with-env python -m benchmarks.weight_breakdown runs/ala4 --n 20000 \\
        --out benchmarks/results/weight_breakdown.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_record
from cmt_openmm.coordinates.backbone import phi_angles, phi_residue_names, turn_contacts, turn_hydrogen_bonds
from cmt_openmm.runs import Run
from cmt_openmm.sampling.estimators import MIN_EFFECTIVE_SAMPLES, effective_samples, weighted_mean


def peptide_states(topology, positions: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Boolean masks (N,) of the states above for configurations ``positions`` (N, n_atoms, 3) nm:
    ``{"phi-sign": {pattern: mask}, "turn hydrogen bonds": {name: mask, "no turn": mask}}``."""
    signs = phi_angles(topology, positions) >= 0.0
    patterns = np.array(["".join("+" if s else "-" for s in row) for row in signs])
    phi_sign = {pattern: patterns == pattern for pattern in sorted(set(patterns))}
    contacts = turn_contacts(topology, positions)
    turns = {name: contacts[:, k] for k, (_, _, name) in enumerate(turn_hydrogen_bonds(topology))}
    if turns:
        turns["no turn"] = ~np.any(list(turns.values()), axis=0)
    return {"phi-sign": phi_sign, "turn hydrogen bonds": turns}


def breakdown(masks: dict[str, np.ndarray], weights: np.ndarray) -> list[dict]:
    """One row per state of ``masks`` (name -> (N,) bool): its raw share, reweighted population and
    error, their ratio, its share of Σ w̄² and the ESS within it (fractions; 0 for a state whose
    samples all have weight 0); ``weights`` (N,) normalised importance weights."""
    n, total_square = len(weights), float(weights @ weights)
    rows = []
    for name, mask in masks.items():
        raw = float(mask.mean())
        population = weighted_mean(mask.astype(float), weights)
        inside = weights[mask]
        rows.append({"state": name, "raw": raw, "reweighted": float(population.value),
                     "error": float(population.error), "ratio": float(population.value) / raw if raw else np.nan,
                     "square_share": float(inside @ inside) / total_square,
                     # Kish count of the renormalised weights: tiny weights' squares do not underflow
                     "ess_within": effective_samples(inside) / mask.sum() if inside.any() else 0.0})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a trained peptide run")
    parser.add_argument("--n", type=int, default=20_000, help="generator samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    run = Run.open(args.run_dir)
    ensemble = run.sample(args.n, seed=args.seed, progress=False)
    weights = ensemble.weights
    n_effective = float(1.0 / (weights @ weights))
    record = {"run_dir": str(args.run_dir), "n": args.n, "seed": args.seed, "reverse_ess": n_effective / args.n,
              "n_effective": n_effective, "reliable": n_effective >= MIN_EFFECTIVE_SAMPLES,
              "residues": phi_residue_names(run.target.topology), "states": {}}
    verdict = "" if record["reliable"] else (f" (N_eff {n_effective:.1f}: the figures below rest on a few samples "
                                              "and are unreliable)")
    print(f"{args.run_dir}: reverse ESS {100 * record['reverse_ess']:.2f} % of {args.n:,} samples{verdict}; "
          f"φ signs of {', '.join(record['residues'])}")
    columns = {"state": "{state}", "raw %": "{raw_pct:.2f}", "reweighted %": "{reweighted_pct:.3g} ± {error_pct:.2g}",
               "reweighted / raw": "{ratio:.2f}", "share of Σ w̄²": "{square_share:.3f}",
               "ESS within %": "{ess_within_pct:.2f}"}
    for kind, masks in peptide_states(run.target.topology, np.asarray(ensemble.positions)).items():
        rows = breakdown(masks, weights)
        record["states"][kind] = rows
        if rows:
            print(f"\n{kind}:")
            percent = {"raw_pct": "raw", "reweighted_pct": "reweighted", "error_pct": "error",
                       "ess_within_pct": "ess_within"}
            print_table([{**r, **{k: 100 * r[v] for k, v in percent.items()}} for r in rows], columns)
    if args.out:
        write_record(args.out, record)
    return record


if __name__ == "__main__":
    main()
