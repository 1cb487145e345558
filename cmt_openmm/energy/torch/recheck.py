"""A cheap re-check of the torch energy on a run's own samples, with a switch to OpenMM.

Verification at construction (:mod:`.verification`) sees structures near the reference; during
training the flow goes where it goes. :func:`recheck` compares the torch energy with OpenMM's
Reference platform on a few of the flow's samples (every K annealing steps, say) and returns
JSON-ready fields for the run's metrics record. On a disagreement beyond the verification
tolerances (relative energy |dE| / max(|E|, kT), relative force max_atom |dF| / max(max_atom |F|,
kT/nm); or a configuration one backend evaluates and the other cannot) the energy switches
itself to OpenMM (:meth:`~.energy.TorchEnergy.switch_to_openmm`) with a one-line warning: the
run never goes on silently with energies that were found wrong. An energy that is not torch (or
already switched) is not checked.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .verification import (
    ENERGY_TOLERANCE,
    FLOAT32_ENERGY_TOLERANCE,
    FLOAT32_FORCE_TOLERANCE,
    FORCE_TOLERANCE,
    _openmm_by_term,
    _relative_errors,
)

__all__ = ["recheck"]


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def recheck(energy: Any, x: Any, n: int = 4, seed: int = 0) -> dict[str, Any]:
    """Compare ``energy`` with OpenMM's Reference platform on ``n`` of the samples ``x``
    (B, n_atoms, 3) nm (tensor or array; rows drawn with ``seed``) and switch it to OpenMM on a
    mismatch. Returns ``recheck_n`` (configurations compared; 0 when ``energy`` is not torch),
    ``recheck_max_abs_energy_error_kT``, ``recheck_max_relative_energy_error``,
    ``recheck_max_relative_force_error`` (None where not finite), ``recheck_passed`` (None when
    nothing was compared) and ``recheck_switched_to_openmm``; none of the checked evaluations
    counts in ``energy.n_evaluations``.

    >>> import cmt_openmm, numpy as np
    >>> target = cmt_openmm.get_target("aldp-vacuum")
    >>> energy = cmt_openmm.TorchEnergy(target, verify=False)
    >>> x = target.positions + 0.05 * np.random.default_rng(0).standard_normal((16, 22, 3))
    >>> record = recheck(energy, x)
    >>> record["recheck_n"], record["recheck_passed"], energy.backend
    (4, True, 'torch')
    """
    record: dict[str, Any] = {
        "recheck_n": 0,
        "recheck_max_abs_energy_error_kT": None,
        "recheck_max_relative_energy_error": None,
        "recheck_max_relative_force_error": None,
        "recheck_passed": None,
        "recheck_switched_to_openmm": False,
    }
    if getattr(energy, "backend", None) != "torch":
        return record
    x = x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    rows = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    x = x[np.sort(rows)]
    u, grad = energy._evaluate(torch.as_tensor(x), gradient=True, count=False)
    kT = float(energy.target.kT)
    e = u.to("cpu", torch.float64).numpy() * kT
    f = -grad.to("cpu", torch.float64).numpy() * kT
    e_ref, f_ref, _, _ = _openmm_by_term(energy.target.system, [], x)
    ok_ref = np.isfinite(e_ref) & np.isfinite(f_ref).all(axis=(1, 2))
    ok = np.isfinite(e) & np.isfinite(f).all(axis=(1, 2))
    both = ok & ok_ref
    e_err, f_err = _relative_errors(e[both], f[both], e_ref[both], f_ref[both], kT)
    float32 = energy.dtype == torch.float32
    e_tol = FLOAT32_ENERGY_TOLERANCE if float32 else ENERGY_TOLERANCE
    f_tol = FLOAT32_FORCE_TOLERANCE if float32 else FORCE_TOLERANCE
    disagree = int((ok != ok_ref).sum()) + int(((e_err > e_tol) | (f_err > f_tol)).sum())
    max_e = float(e_err.max()) if both.any() else 0.0
    max_f = float(f_err.max()) if both.any() else 0.0
    record.update(
        recheck_n=int(len(x)),
        recheck_max_abs_energy_error_kT=_finite_or_none(np.abs(e - e_ref)[both].max() / kT) if both.any() else 0.0,
        recheck_max_relative_energy_error=_finite_or_none(max_e),
        recheck_max_relative_force_error=_finite_or_none(max_f),
        recheck_passed=disagree == 0,
    )
    if disagree:
        name = getattr(energy.target, "name", "the target")
        unevaluated = int((ok != ok_ref).sum())
        what = f"relative energy error {max_e:.1e}, force {max_f:.1e}; tolerances {e_tol:.0e}, {f_tol:.0e}"
        if unevaluated:
            what += f"; {unevaluated} evaluated by only one of them"
        reason = f"torch disagreed with OpenMM on {disagree} of {len(x)} of the run's samples ({what})"
        energy.switch_to_openmm(reason)
        record["recheck_switched_to_openmm"] = True
        warnings.warn(f"Energies of {name} come from OpenMM from now on: {reason}.", stacklevel=2)
    return record
