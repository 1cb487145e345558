"""Command-line options shared by the commands that run replica exchange through openmmtools
(``reference-md``, ``mcmc``, ``bridge-remd``): where the run is stored, how it resumes, its seed
and its OpenMM platform."""
from __future__ import annotations

import argparse


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """``--equilibration``, ``--seed``, ``--storage``, ``--restart`` and ``--platform``."""
    p.add_argument("--equilibration", type=int, default=0, help="iterations left out of the npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", help="netCDF storage (default: OUT with .nc)")
    p.add_argument("--restart", action="store_true", help="discard existing storage instead of resuming")
    p.add_argument("--platform", default="auto",
                   help="OpenMM platform (default auto: the faster of Reference and CPU for this System)")
