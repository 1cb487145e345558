"""Peptides built offline from a sequence: the named ala4/ala6/elil targets and `peptide()`.

Chirality is judged against structures we did not build: openmmtools' alanine dipeptide and
its T4 lysozyme crystal structure (every amino acid but Cys; Ile and Thr for the Cβ centres).
Structures are cached in a temporary directory (``CMT_OPENMM_CACHE``) for the whole module.
"""

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from cmt_openmm.coordinates import InternalCoordinates
from cmt_openmm.errors import CMTInputError
from cmt_openmm.generator import BoltzmannGenerator
from cmt_openmm.systems import aldp_pdb_path, get_target, list_targets, peptide
from cmt_openmm.systems import peptides as peptides_module
from cmt_openmm.units import dihedral_angles

NAMED = {  # name: (atoms, residue names, constrained)
    "ala4": (42, ["ACE"] + ["ALA"] * 3 + ["NME"], False),
    "ala6": (62, ["ACE"] + ["ALA"] * 5 + ["NME"], False),
    "elil": (75, ["GLU", "LEU", "ILE", "LEU"], False),
    "ala4-hbonds": (42, ["ACE"] + ["ALA"] * 3 + ["NME"], True),
    "ala6-hbonds": (62, ["ACE"] + ["ALA"] * 5 + ["NME"], True),
    "elil-hbonds": (75, ["GLU", "LEU", "ILE", "LEU"], True),
}
ALL_20 = {"capped": "ACDEFGHIKL", "zwitterion": "MNPQRSTVWY"}  # every amino acid, both termini
RINGS = {"capped": 2, "zwitterion": 4}  # F, H / P, W (two), Y
REFERENCE = openmm.Platform.getPlatformByName("Reference")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cmt-openmm-cache")
        patch.setenv("CMT_OPENMM_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def named():
    return {name: get_target(name) for name in NAMED}


@pytest.fixture(scope="module")
def all20():
    return {termini: peptide(seq, termini=termini) for termini, seq in ALL_20.items()}


def _volumes(topology, x):
    """{(residue index, centre): (residue name, signed volumes (B,))} of the Cα and Ile/Thr Cβ centres."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, topology.getNumAtoms(), 3)
    out = {}
    for res in topology.residues():
        at = {a.name: a.index for a in res.atoms()}
        centres = {"CA": ("CA", "N", "C", "CB")}
        if res.name in ("ILE", "THR"):
            centres["CB"] = ("CB", "CA", "CG1" if res.name == "ILE" else "OG1", "CG2")
        for centre, (c, a, b, d) in centres.items():
            if all(n in at for n in (c, a, b, d)):
                u, v, w = (x[:, at[n]] - x[:, at[c]] for n in (a, b, d))
                out[res.index, centre] = (res.name, np.einsum("bi,bi->b", u, np.cross(v, w)))
    return out


@pytest.fixture(scope="module")
def natural_signs():
    """Sign of each centre in natural (L) amino acids: from T4 lysozyme, checked against alanine dipeptide."""
    t4l = app.PDBFile(str(aldp_pdb_path().parents[1] / "T4-lysozyme-L99A-implicit" / "receptor.pdb"))
    signs: dict = {}
    for (_, centre), (name, vol) in _volumes(t4l.topology, t4l.positions.value_in_unit(unit.nanometer)).items():
        signs.setdefault(centre if centre == "CA" else (name, centre), set()).add(int(np.sign(vol[0])))
    # every Cα of the 18 types with a Cβ there (no Cys) has one sign; so have the Ile and the Thr Cβ
    assert set(signs) == {"CA", ("ILE", "CB"), ("THR", "CB")} and all(len(s) == 1 for s in signs.values())
    aldp = app.PDBFile(str(aldp_pdb_path()))
    (_, vol), = _volumes(aldp.topology, aldp.positions.value_in_unit(unit.nanometer)).values()
    assert {int(np.sign(vol[0]))} == signs["CA"]
    return {key: s.pop() for key, s in signs.items()}


def _assert_natural(topology, x, natural_signs):
    volumes = _volumes(topology, x)
    assert volumes
    for (index, centre), (name, vol) in volumes.items():
        sign = natural_signs["CA" if centre == "CA" else (name, centre)]
        assert np.all(np.sign(vol) == sign), f"{name}{index + 1} {centre} is mirrored"


def test_named_peptides_are_registered():
    assert set(NAMED) <= set(list_targets())


@pytest.mark.parametrize("name", list(NAMED))
def test_named_peptides(named, name):
    n_atoms, residues, constrained = NAMED[name]
    target = named[name]
    assert target.name == name and target.temperature == 300.0 and target.n_atoms == n_atoms
    assert [r.name for r in target.topology.residues()] == residues
    assert not target.system.usesPeriodicBoundaryConditions()
    forces = {type(f).__name__ for f in target.system.getForces()} - {"CMMotionRemover"}
    assert forces == {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "NonbondedForce",
                      "GBSAOBCForce"}
    for force in target.system.getForces():
        if isinstance(force, (openmm.NonbondedForce, openmm.GBSAOBCForce)):
            assert force.getNonbondedMethod() == 0  # NoCutoff
    h_bonds = {frozenset((a.index, b.index)) for a, b in target.topology.bonds()
               if app.element.hydrogen in (a.element, b.element)}
    assert {frozenset(c[:2]) for c in target.constraints} == (h_bonds if constrained else set())
    if name.startswith("elil"):  # charged termini: NH3+ and COO-
        neighbours = {}
        for a, b in target.topology.bonds():
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
        residues = list(target.topology.residues())
        n = next(a for a in residues[0].atoms() if a.name == "N")
        c = next(a for a in residues[-1].atoms() if a.name == "C")
        assert sorted(a.element.symbol for a in neighbours[n]) == ["C", "H", "H", "H"]
        assert sorted(a.name for a in neighbours[c]) == ["CA", "O", "OXT"]


@pytest.mark.parametrize("name", ["ala4", "ala6", "elil", "elil-hbonds"])
def test_minimised_trans_l_structures(named, natural_signs, name):
    target = named[name]
    x = target.positions
    _assert_natural(target.topology, x, natural_signs)
    omegas = _omegas(target.topology, x)
    assert len(omegas) == {"ala4": 4, "ala6": 6}.get(name, 3) and np.all(np.abs(omegas) > np.radians(150))
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), REFERENCE)
    context.setPositions(x)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer).ravel()
    if target.constraints:  # at a constrained minimum the forces are balanced by the constraints' reactions
        normals = np.zeros((forces.size, len(target.constraints)))
        for k, (i, j, _) in enumerate(target.constraints):
            e = (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
            normals[3 * i:3 * i + 3, k], normals[3 * j:3 * j + 3, k] = e, -e
        forces = forces - normals @ np.linalg.lstsq(normals, forces, rcond=None)[0]
    assert np.isfinite(energy) and energy < 0
    assert np.sqrt(np.mean(forces ** 2)) < 30.0  # a minimum, up to the PDB file's 0.001 Å rounding


def _omegas(topology, x):
    """ω (rad) of every peptide bond: CA(i)-C(i)-N(i+1)-CA(i+1), caps' methyl carbons included."""
    quads = []
    for a, b in topology.bonds():
        c, n = (a, b) if a.name == "C" else (b, a)
        if c.name == "C" and n.name == "N" and c.residue is not n.residue:
            ca1 = next(t for t in c.residue.atoms() if t.name in ("CA", "CH3"))
            ca2 = next(t for t in n.residue.atoms() if t.name == ("C" if n.residue.name == "NME" else "CA"))
            quads.append((ca1.index, c.index, n.index, ca2.index))
    return dihedral_angles(x, quads)[0]


@pytest.mark.parametrize("termini", list(ALL_20))
def test_every_amino_acid(all20, natural_signs, termini):
    target = all20[termini]
    one = {v: k for k, v in peptides_module.ONE_LETTER.items()}
    names = [r.name for r in target.topology.residues()]
    core = names[1:-1] if termini == "capped" else names
    assert "".join(one[n] for n in core) == ALL_20[termini]
    _assert_natural(target.topology, target.positions, natural_signs)
    seq = ALL_20[termini]
    n_centres = len(seq) - seq.count("G") + seq.count("I") + seq.count("T")  # Cα but Gly's; Ile/Thr Cβ
    assert len(_volumes(target.topology, target.positions)) == n_centres
    assert np.all(np.abs(_omegas(target.topology, target.positions)) > np.radians(150))
    assert np.isfinite(target.reduced_potential(target.positions))


def test_cache_gives_the_same_structure(cache, named, monkeypatch, tmp_path):
    first = named["ala4"]
    files = sorted((cache / "peptides").glob("*.pdb"))
    assert len(files) >= 6
    monkeypatch.setattr(peptides_module, "_build", lambda *a, **k: pytest.fail("rebuilt a cached peptide"))
    again = peptide("AAA")  # the same structure as "ala4", read from the cache
    np.testing.assert_array_equal(again.positions, first.positions)
    assert again.topology_fingerprint() == first.topology_fingerprint()
    assert again.system_fingerprint() == first.system_fingerprint()
    monkeypatch.undo()

    # A corrupt file (here: one changed coordinate) is rebuilt, to the same structure.
    path = next(p for p in files if "\"sequence\": \"AAA\"" in p.read_text() and "HBonds" not in p.read_text())
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.startswith(("ATOM", "HETATM")))
    path.write_text(text.replace(line, line[:30] + "   9.999" + line[38:], 1))
    rebuilt = peptide("AAA")
    np.testing.assert_array_equal(rebuilt.positions, first.positions)
    assert path.read_text() == text

    # A cold build elsewhere (another cache directory) gives the identical file: the build is deterministic.
    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    cold = peptide("AAA")
    np.testing.assert_array_equal(cold.positions, first.positions)
    assert (tmp_path / "peptides" / path.name).read_text() == text


@pytest.mark.parametrize("termini", list(ALL_20))
def test_ring_peptides_have_internal_coordinates(all20, termini):
    target = all20[termini]
    ic = InternalCoordinates(target.topology, target.positions, target.constraints)
    assert len(ic.zmatrix.ring_closures) == RINGS[termini]
    x = torch.as_tensor(target.positions)[None]
    z, _ = ic(x)
    x_std, _ = ic.inverse(z)
    rotation, shift = ic.frame(x)
    np.testing.assert_allclose((x_std @ rotation.transpose(1, 2) + shift[:, None])[0].numpy(), target.positions,
                               atol=1e-9)
    assert not ic.chirality_flipped(x).any()


@pytest.mark.parametrize("name", ["elil", "zwitterion"])
def test_generator_samples_keep_chirality(named, all20, natural_signs, name):
    target = named[name] if name in named else all20[name]
    generator = BoltzmannGenerator.build(target, n_layers=2, hidden=16)
    x, log_q = generator.sample(200, torch.Generator().manual_seed(0))
    assert x.shape == (200, target.n_atoms, 3) and torch.isfinite(log_q).all()
    assert not generator.chirality_flipped(x).any()
    _assert_natural(target.topology, x.numpy(), natural_signs)


@pytest.mark.parametrize("kwargs, words", [
    ({"sequence": "AXA"}, "unknown amino-acid letters 'X'"),
    ({"sequence": "aaa"}, "lower case"),
    ({"sequence": ""}, "non-empty string"),
    ({"sequence": "AAA", "termini": "amidated"}, "termini must be one of"),
    ({"sequence": "AAA", "constraints": "AllBonds"}, "constraints must be None or 'HBonds'"),
    ({"sequence": "AAA", "implicit": "implicit/gbn3.xml"}, "force-field file implicit/gbn3.xml was not found"),
])
def test_refusals(kwargs, words):
    with pytest.raises(CMTInputError, match=words):
        peptide(**kwargs)
