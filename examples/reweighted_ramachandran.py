"""Reweighted Ramachandran free-energy surface with error bars, from a trained Boltzmann generator.

Draws samples from the generator, weights them towards the Boltzmann distribution with raw
OpenMM energies (w = exp(-u) / q), and writes a PNG with two panels: the (φ, ψ) free-energy
surface in kT and its bootstrap standard error per bin. It also prints the ALDP basin
populations and free-energy differences with their errors.

    # a run directory written by `cmt-openmm train` (or `cmt-openmm demo`)
    python examples/reweighted_ramachandran.py --run runs/demo --n 20000 --out fes.png
    # a generator file and the system it was trained for
    python examples/reweighted_ramachandran.py --generator g.safetensors --system aldp-vacuum
    # no generator at hand: train a tiny one first (seconds; a rough, noisy surface)
    python examples/reweighted_ramachandran.py --tiny --out fes.png
"""
import argparse
from pathlib import Path

import numpy as np
import torch

import cmt_openmm
from cmt_openmm.sampling.estimators import basin_free_energies, basin_populations
from cmt_openmm.analysis.plots import plot_free_energy_surface


def tiny_generator(target, seed: int):
    """Two CMT annealing steps with a small flow: enough to show the workflow, not a good model."""
    config = {
        "method": "cmt", "seed": seed, "max_steps": 2,
        "flow": {"n_layers": 2, "hidden": 16, "n_bins": 4},
        "cmt": {"n_samples": 256, "fit_steps": 4, "batch_size": 64},
    }
    return cmt_openmm.train(target, config, progress=False).generator


def load(args):
    """(target, generator) from a run directory, a generator file, or a tiny training run."""
    if args.run:
        run = cmt_openmm.Run.open(args.run)
        return run.target, run.generator
    target = cmt_openmm.get_target(args.system, args.temperature)
    if args.generator:
        return target, cmt_openmm.BoltzmannGenerator.load(args.generator, target)
    return target, tiny_generator(target, args.seed)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory of `cmt-openmm train`")
    source.add_argument("--generator", help="a saved generator (.safetensors); give --system too")
    source.add_argument("--tiny", action="store_true", help="train a tiny generator first (seconds)")
    p.add_argument("--system", default="aldp-vacuum")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--n", type=int, default=20_000, help="generator samples")
    p.add_argument("--bins", type=int, default=40, help="bins per angle")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamplings for the error bars")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ramachandran_fes.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    target, generator = load(args)
    ensemble = cmt_openmm.reweight(generator, target, args.n, seed=args.seed)
    print(f"{len(ensemble)} samples, reverse ESS {100 * ensemble.ess:.2f} %, {ensemble.n_failed} with weight 0")

    phi_psi = ensemble.ramachandran_angles()[:, 0]  # first backbone (φ, ψ) pair, radians
    fes = ensemble.free_energy_surface(phi_psi, bins=args.bins, range=[(-np.pi, np.pi)] * 2,
                                       error="bootstrap", n_bootstrap=args.bootstrap, seed=args.seed)
    png = plot_free_energy_surface(
        fes.free_energy, fes.edges[0], fes.edges[1], args.out, uncertainty=fes.error,
        title=f"{target.name}, {target.temperature:g} K, reweighted (ESS {100 * ensemble.ess:.1f} %)")

    populations = basin_populations(phi_psi, ensemble.weights)  # delta-method errors
    # ΔF relative to the most populated basin, errors from the weights (basin covariances included)
    free_energies = basin_free_energies(phi_psi, ensemble.weights, kT=1.0) if ensemble.weights.any() else {}
    if not ensemble.reliable:
        print(f"only {ensemble.n_effective:.1f} effective samples: the estimates below are unreliable")
    print(f"{'basin':<8} {'population':>20} {'ΔF (kT)':>16}")
    for name, (value, error) in populations.items():
        dF = free_energies.get(name)
        dF_text = f"{dF.value:.2f} ± {dF.error:.2f}" if dF is not None and value > 0 else "empty"
        print(f"{name:<8} {value:>11.4f} ± {error:.4f} {dF_text:>16}")
    print(f"wrote {png}")
    return {"png": Path(png), "ess": ensemble.ess, "populations": populations, "free_energies": free_energies,
            "surface": fes}


if __name__ == "__main__":
    main()
