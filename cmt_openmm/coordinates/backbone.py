"""A peptide's backbone dihedrals (φ, ψ) found from its Topology, and their values in configurations.

Used by every layer that speaks of conformations: the φ-sign strata of training, reweighted
basin populations, Ramachandran metrics and plots. The angles agree with mdtraj's
``compute_phi`` / ``compute_psi`` (tested).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import CMTInputError
from ..units import dihedral_angles

PHI_POSITIVE_BASIN = (0.0, 2.0 * np.pi / 3.0)
"""The φ > 0 basin of a residue (αL ∪ C7ax) as a [lo, hi) interval of φ in radians: 0° ≤ φ < 120°.
φ ∈ [120°, 180°) belongs to the β region that reaches across φ = ±180°."""


def _backbone_residues(topology: Any):
    """(C(i-1), N(i), CA(i), C(i), N(i+1)) atom indices of every residue with ``N``, ``CA`` and ``C``,
    in chain order, then the residue's name and id (``LEU4``); a neighbour's atom is None where it is
    missing or, when the topology has bonds, not bonded to this residue by a peptide bond."""
    if hasattr(topology, "to_openmm"):  # mdtraj.Topology
        topology = topology.to_openmm()
    bonds = {frozenset((a.index, b.index)) for a, b in topology.bonds()}

    def linked(i: int | None, j: int | None) -> bool:
        return i is not None and j is not None and (not bonds or frozenset((i, j)) in bonds)

    for chain in topology.chains():
        residues = list(chain.residues())
        names = [{atom.name: atom.index for atom in residue.atoms()} for residue in residues]
        for k, atoms in enumerate(names):
            n, ca, c = atoms.get("N"), atoms.get("CA"), atoms.get("C")
            if n is None or ca is None or c is None:
                continue
            prev_c = names[k - 1].get("C") if k > 0 else None
            next_n = names[k + 1].get("N") if k + 1 < len(names) else None
            yield ((prev_c if linked(prev_c, n) else None), n, ca, c, (next_n if linked(c, next_n) else None),
                   f"{residues[k].name}{residues[k].id}")


def backbone_dihedrals(topology: Any) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """Backbone (φ, ψ) atom quadruples of every residue that has both, in chain order.

    φ_i = C(i-1)-N(i)-CA(i)-C(i) and ψ_i = N(i)-CA(i)-C(i)-N(i+1), found from atom names
    (``N``, ``CA``, ``C``) of consecutive residues of one chain; when the topology has bonds,
    the peptide bonds C(i-1)-N(i) and C(i)-N(i+1) must be among them. Caps (ACE, NME) supply
    the outer C / N, so alanine dipeptide gives one pair. Accepts an `openmm.app.Topology` or
    an `mdtraj.Topology`.
    """
    return [((prev_c, n, ca, c), (n, ca, c, next_n)) for prev_c, n, ca, c, next_n, _ in _backbone_residues(topology)
            if prev_c is not None and next_n is not None]


def backbone_phis(topology: Any) -> list[tuple[int, int, int, int]]:
    """Atom quadruples C(i-1)-N(i)-CA(i)-C(i) of every backbone φ, in chain order: those of
    :func:`backbone_dihedrals` and also a C-terminal residue's, which has no ψ (an uncapped
    peptide's last residue)."""
    return [(prev_c, n, ca, c) for prev_c, n, ca, c, _, _ in _backbone_residues(topology) if prev_c is not None]


def phi_residue_names(topology: Any) -> list[str]:
    """The residue of each :func:`backbone_phis` entry, as name and id (``["LEU2", "ILE3", "LEU4"]``)."""
    return [name for prev_c, *_, name in _backbone_residues(topology) if prev_c is not None]


def phi_angles(topology: Any, x: Any) -> np.ndarray:
    """Every backbone φ (:func:`backbone_phis`): x (B, n_atoms, 3) nm -> (B, n_phi) radians in [-π, π)."""
    quads = backbone_phis(topology)
    if not quads:
        raise CMTInputError("the topology has no backbone φ: φ angles need a peptide.")
    return dihedral_angles(x, quads)


def in_phi_positive_basin(phi: np.ndarray) -> np.ndarray:
    """Whether each φ (any shape, radians in [-π, π)) lies in :data:`PHI_POSITIVE_BASIN`."""
    return (phi >= PHI_POSITIVE_BASIN[0]) & (phi < PHI_POSITIVE_BASIN[1])


def ramachandran_angles(topology: Any, x: Any) -> np.ndarray:
    """(φ, ψ) of every backbone pair: x (B, n_atoms, 3) nm -> (B, n_pairs, 2) radians in [-π, π)."""
    pairs = backbone_dihedrals(topology)
    if not pairs:
        raise CMTInputError("the topology has no backbone (φ, ψ) pair: Ramachandran metrics need a peptide.")
    quads = [quad for pair in pairs for quad in pair]
    angles = dihedral_angles(x, quads)
    return angles.reshape(angles.shape[0], len(pairs), 2)


@dataclass(frozen=True)
class BackboneAngles:
    """A peptide's backbone angles in N configurations, radians in [-π, π): ``pairs`` (N, n_pairs, 2),
    the (φ, ψ) of :func:`ramachandran_angles`, and ``phi`` (N, n_phi), every φ of
    :func:`phi_angles` (an uncapped peptide's C-terminal residue has a φ but no ψ). What an ensemble
    keeps of its samples for basin populations and Ramachandran metrics once positions are gone."""

    pairs: np.ndarray
    phi: np.ndarray

    @classmethod
    def of(cls, topology: Any, x: Any) -> BackboneAngles:
        """The angles of configurations x (B, n_atoms, 3) nm."""
        return cls(ramachandran_angles(topology, x), phi_angles(topology, x))

    @classmethod
    def concatenate(cls, parts: Sequence[BackboneAngles]) -> BackboneAngles:
        """The configurations of ``parts``, in order."""
        return cls(np.concatenate([p.pairs for p in parts]), np.concatenate([p.phi for p in parts]))

    @classmethod
    def empty(cls, n: int, like: BackboneAngles) -> BackboneAngles:
        """Room for n configurations of ``like``'s peptide, filled a block at a time with :meth:`put`
        (a large draw's angles are never held twice)."""
        return cls(np.empty((int(n),) + like.pairs.shape[1:]), np.empty((int(n),) + like.phi.shape[1:]))

    def put(self, rows: slice, part: BackboneAngles) -> None:
        """Write ``part``'s configurations into ``rows``."""
        self.pairs[rows], self.phi[rows] = part.pairs, part.phi


TURN_HBOND_CUTOFF = 0.25
"""nm: a turn's hydrogen bond, amide H to carbonyl O closer than this."""
TURN_SPANS = (3, 4)
"""Residues from acceptor to donor: 3₁₀ (i → i + 3) and α (i → i + 4) turns."""


def turn_hydrogen_bonds(topology: Any) -> list[tuple[int, int, str]]:
    """(carbonyl O index, amide H index, name) of every residue pair i, i + 3 or i + 4 of one chain
    that has an ``O`` and an ``H``, caps counted as residues (``"ACE1 O → ALA4 H"``). Their contacts
    hold a helical turn; each depends on every backbone torsion between the two residues at once."""
    if hasattr(topology, "to_openmm"):  # mdtraj.Topology
        topology = topology.to_openmm()
    pairs = []
    for chain in topology.chains():
        residues = list(chain.residues())
        atoms = [{atom.name: atom.index for atom in residue.atoms()} for residue in residues]
        for i, acceptor in enumerate(atoms):
            for span in TURN_SPANS:
                if i + span < len(atoms) and "O" in acceptor and "H" in atoms[i + span]:
                    donor = residues[i + span]
                    pairs.append((acceptor["O"], atoms[i + span]["H"],
                                  f"{residues[i].name}{residues[i].id} O → {donor.name}{donor.id} H"))
    return pairs


def turn_contacts(topology: Any, x: Any) -> np.ndarray:
    """(B, n_pairs) bool: which :func:`turn_hydrogen_bonds` configurations x (B, n_atoms, 3) nm form."""
    x = np.asarray(x)
    pairs = turn_hydrogen_bonds(topology)
    if not pairs:
        return np.zeros((x.shape[0], 0), bool)
    o, h = (np.array(column) for column in zip(*[(o, h) for o, h, _ in pairs]))
    return np.linalg.norm(x[:, o] - x[:, h], axis=-1) < TURN_HBOND_CUTOFF


def is_peptide(target) -> bool:
    """True when the topology has at least one backbone (φ, ψ) pair."""
    return target.has_molecule and bool(backbone_dihedrals(target.topology))
