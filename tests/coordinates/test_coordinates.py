"""Internal and Cartesian coordinate transforms: round trips, exact log-determinants, wrapping,
constraints, chirality and the Z-matrix built from the bond graph (ALDP and cyclohexane)."""
import math
from types import SimpleNamespace

import numpy as np
import openmm.app as app
import openmm.unit as unit
import pytest
import torch
from openmm.app import element
from openmmtools.testsystems import get_data_filename

from cmt_openmm.coordinates import CartesianCoordinates, InternalCoordinates, coordinates_for
from cmt_openmm.errors import CMTInputError
from cmt_openmm.units import wrap_angle
from helpers import random_rotation

ALDP_PDB = "data/alanine-dipeptide-gbsa/alanine-dipeptide.pdb"


@pytest.fixture(scope="module")
def aldp():
    pdb = app.PDBFile(get_data_filename(ALDP_PDB))
    return pdb.topology, np.array(pdb.positions.value_in_unit(unit.nanometer))


def _cyclohexane():
    """Chair cyclohexane (18 atoms, one six-membered ring) with tetrahedral hydrogens."""
    top = app.Topology()
    res = top.addResidue("CHX", top.addChain())
    carbons = [top.addAtom(f"C{k + 1}", element.carbon, res) for k in range(6)]
    radius, height = 0.1446, 0.025
    pos = [np.array([radius * math.cos(k * math.pi / 3), radius * math.sin(k * math.pi / 3),
                     height * (-1) ** k]) for k in range(6)]
    for k in range(6):
        top.addBond(carbons[k], carbons[(k + 1) % 6])
    half = math.radians(109.5) / 2
    for k in range(6):
        c, a, b = pos[k], pos[k - 1], pos[(k + 1) % 6]
        u = 2 * c - a - b
        u /= np.linalg.norm(u)
        n = np.cross(a - c, b - c)
        n /= np.linalg.norm(n)
        for sign, name in ((1, "A"), (-1, "B")):
            h = top.addAtom(f"H{k + 1}{name}", element.hydrogen, res)
            top.addBond(carbons[k], h)
            pos.append(c + 0.109 * (math.cos(half) * u + sign * math.sin(half) * n))
    return top, np.array(pos)


@pytest.fixture(scope="module")
def ring():
    return _cyclohexane()


def _water(n_molecules=1):
    top = app.Topology()
    pos = []
    for m in range(n_molecules):
        res = top.addResidue("HOH", top.addChain())
        o = top.addAtom("O", element.oxygen, res)
        for name, p in (("H1", [0.09572, 0, 0]), ("H2", [-0.024, 0.0927, 0])):
            top.addBond(o, top.addAtom(name, element.hydrogen, res))
            pos.append(p)
        pos.insert(3 * m, [0.0, 0.0, 0.0])
    return top, np.array(pos) + 0.5 * np.arange(n_molecules).repeat(3)[:, None]


def _perturbed(pos, batch, scale, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(pos, dtype=torch.float64).expand(batch, -1, -1)
    x = x + scale * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    x = x @ torch.as_tensor(random_rotation(seed)).T + torch.randn(3, generator=gen, dtype=torch.float64)
    return x.to(dtype)


def _molecule(name, aldp, ring):
    return aldp if name == "aldp" else ring


def test_aldp_zmatrix_counts_and_seeds(aldp):
    top, pos = aldp
    ic = InternalCoordinates(top, pos)
    names = [a.name for a in top.atoms()]
    assert ic.dim == 60 and len(ic.kinds) == 60 and ic.reference_z.shape == (60,)
    counts = {k: ic.kinds.count(k) for k in set(ic.kinds)}
    assert counts == {"bond": 21, "angle": 20, "torsion": 7, "relative_torsion": 12}
    assert ic.circular_mask.tolist() == [k == "torsion" for k in ic.kinds]
    assert [names[a] for a in ic.seeds] == ["CA", "C", "N"]
    circular = [n for n, c in zip(ic.names, ic.circular_mask) if c]
    assert "torsion C(ACE1)-N(ALA2)-CA(ALA2)-C(ALA2)" in circular  # phi
    assert "torsion N(NME3)-C(ALA2)-CA(ALA2)-N(ALA2)" in circular  # psi
    assert names.index("CA") in ic.chiral_centres
    assert not ic.chirality_flipped(torch.as_tensor(pos)[None]).any()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", ["aldp", "ring"])
def test_round_trip_up_to_rigid_motion(name, dtype, tol, aldp, ring):
    top, pos = _molecule(name, aldp, ring)
    ic = InternalCoordinates(top, pos, dtype=dtype)
    x = _perturbed(pos, 64, 0.01, dtype=dtype)
    z, logdet = ic(x)
    x_std, logdet_inv = ic.inverse(z)
    rot, t = ic.frame(x)
    assert z.dtype == x_std.dtype == dtype
    assert (x_std @ rot.transpose(1, 2) + t[:, None] - x).abs().max() <= tol
    assert torch.allclose(torch.det(rot), torch.ones(64, dtype=dtype))
    assert (logdet + logdet_inv).abs().max() <= 1e3 * tol
    z2, _ = ic(x_std)
    assert (z2 - z).abs().max() <= 100 * tol


def test_inverse_then_forward_is_identity(aldp):
    top, pos = aldp
    ic = InternalCoordinates(top, pos)
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([0.005 if k == "bond" else 0.1 for k in ic.kinds], dtype=torch.float64)
    z = ic.reference_z + scale * torch.randn(32, ic.dim, generator=gen, dtype=torch.float64)
    z = torch.where(ic.circular_mask, wrap_angle(z), z)
    z2, _ = ic(ic.inverse(z)[0])
    assert (z2 - z).abs().max() < 1e-10


def _euler_rotation(angles: torch.Tensor) -> torch.Tensor:
    """Z-Y-Z Euler rotation R(alpha, beta, gamma); its Haar measure is sin(beta) dalpha dbeta dgamma."""
    def about(axis: int, a: torch.Tensor) -> torch.Tensor:
        c, s = torch.cos(a), torch.sin(a)
        i, j = [k for k in range(3) if k != axis]
        m = torch.eye(3, dtype=a.dtype)
        return m.index_put((torch.tensor([i, i, j, j]), torch.tensor([i, j, i, j])), torch.stack([c, -s, s, c]))
    return about(2, angles[0]) @ about(1, angles[1]) @ about(2, angles[2])


@pytest.mark.parametrize("name", ["aldp", "ring"])
def test_logdet_is_the_physical_density_of_cartesian_space(name, aldp, ring):
    """x = R x_std(z) + t maps (t, Euler angles, z) onto all 3N Cartesian coordinates; its full
    Jacobian must be sin(beta) (the Haar measure of R) times the transform's exp(log|det dx/dz|),
    so that exp(log q_z - logdet) is a density of x with respect to dx / (dt dR)."""
    top, pos = _molecule(name, aldp, ring)
    ic = InternalCoordinates(top, pos)
    z, logdet = ic(_perturbed(pos, 1, 0.01))
    _, logdet_inv = ic.inverse(z)
    euler = torch.tensor([0.4, 1.1, -2.0], dtype=torch.float64)
    shift = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)

    def cartesian(v):
        x_std, _ = ic.inverse(v[6:][None])
        return (x_std[0] @ _euler_rotation(v[3:6]).T + v[:3]).reshape(-1)

    jac = torch.autograd.functional.jacobian(cartesian, torch.cat([shift, euler, z[0]]))
    assert jac.shape == (3 * ic.n_atoms, 3 * ic.n_atoms)
    expected = math.log(math.sin(euler[1])) + logdet_inv.item()
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(expected, abs=1e-8)
    assert (logdet + logdet_inv).abs().item() < 1e-10


def test_torsions_wrapped(aldp):
    top, pos = aldp
    ic = InternalCoordinates(top, pos)
    z, _ = ic(torch.cat([torch.as_tensor(pos)[None], _perturbed(pos, 256, 0.05)]))
    circ = z[:, ic.circular_mask]
    assert (circ >= -math.pi).all() and (circ < math.pi).all()
    rel = torch.tensor([k == "relative_torsion" for k in ic.kinds])
    centre = ic.reference_z[rel]
    assert (z[:, rel] >= centre - math.pi).all() and (z[:, rel] < centre + math.pi).all()
    lo, hi = ic.valid_bounds.T
    assert (lo <= ic.reference_z).all() and (ic.reference_z < hi).all()
    assert (lo < ic.reference_z)[~ic.circular_mask].all()  # ALDP's reference has phi = psi = -pi
    assert (ic.valid_bounds[ic.circular_mask] == torch.tensor([-math.pi, math.pi], dtype=torch.float64)).all()
    wrapped = wrap_angle(torch.tensor([math.pi, -math.pi, 3 * math.pi, -1e-20], dtype=torch.float32))
    assert (wrapped >= -math.pi).all() and (wrapped < math.pi).all()


def test_constraints_excluded_and_restored(aldp):
    top, pos = aldp
    system = app.ForceField("amber99sbildn.xml").createSystem(top, constraints=app.HBonds)
    constraints = [system.getConstraintParameters(i) for i in range(system.getNumConstraints())]
    assert len(constraints) == 12
    ic = InternalCoordinates(top, pos, constraints)
    free = InternalCoordinates(top, pos)
    assert ic.dim == 48 and ic.kinds.count("bond") == 9 and ic.n_constrained == 12
    x = _perturbed(pos, 16, 0.01)
    z, _ = ic(x)
    x_std, logdet_inv = ic.inverse(z)
    for i, j, length in constraints:
        d = (x_std[:, i] - x_std[:, j]).norm(dim=-1)
        assert torch.allclose(d, torch.full_like(d, length.value_in_unit(unit.nanometer)), atol=1e-12)
    z2, logdet = ic(x_std)
    assert (z2 - z).abs().max() < 1e-10
    _, logdet_free = free(x_std)
    assert torch.allclose(logdet, logdet_free, atol=1e-10)
    assert torch.allclose(logdet + logdet_inv, torch.zeros(16, dtype=torch.float64), atol=1e-10)


def test_constraint_off_the_tree_refused(ring):
    top, pos = _water()
    with pytest.raises(CMTInputError, match="remove it"):
        InternalCoordinates(top, pos, [(0, 1, 0.09572), (0, 2, 0.09572), (1, 2, 0.15139)])
    ic = InternalCoordinates(top, pos, [(0, 1, 0.09572), (0, 2, 0.09572)])
    assert ic.dim == 1 and ic.kinds == ["angle"]
    top, pos = ring
    closure = InternalCoordinates(top, pos).zmatrix.ring_closures
    assert len(closure) == 1
    with pytest.raises(CMTInputError, match="not on a bond"):
        InternalCoordinates(top, pos, [(*closure[0], 0.153)])


def test_disconnected_or_bad_input_refused(aldp):
    top, pos = _water(2)
    with pytest.raises(CMTInputError, match="not connected"):
        InternalCoordinates(top, pos)
    top, pos = aldp
    with pytest.raises(CMTInputError, match="Reference positions"):
        InternalCoordinates(top, pos[:-1])
    ic = InternalCoordinates(top, pos)
    with pytest.raises(CMTInputError):
        ic(torch.zeros(2, 21, 3, dtype=torch.float64))
    with pytest.raises(CMTInputError):
        ic.inverse(torch.zeros(2, 59, dtype=torch.float64))


def test_mirror_image_flips_ca(aldp):
    top, pos = aldp
    ic = InternalCoordinates(top, pos)
    x = _perturbed(pos, 8, 0.005)
    ca = ic.chiral_centres.index([a.name for a in top.atoms()].index("CA"))
    assert ic.flipped_fraction(x) == 0.0
    assert ic.flipped_fraction(-x) == 1.0
    assert ic.flipped_centres(-x)[:, ca].all()


@pytest.mark.parametrize("name", ["aldp", "ring"])
def test_relative_torsions_in_bounds_keep_chirality(name, aldp, ring):
    top, pos = _molecule(name, aldp, ring)
    ic = InternalCoordinates(top, pos)
    gen = torch.Generator().manual_seed(2)
    lo, hi = ic.valid_bounds.T
    u = 0.02 + 0.96 * torch.rand(512, ic.dim, generator=gen, dtype=torch.float64)
    x, _ = ic.inverse(lo + (hi - lo) * u)
    assert torch.isfinite(x).all()
    assert ic.flipped_fraction(x) == 0.0
    z = ic.reference_z.clone()[None]
    cb = ic.names.index("relative_torsion CB(ALA2)-CA(ALA2)-C(ALA2)-N(ALA2)") if name == "aldp" else \
        next(i for i, k in enumerate(ic.kinds) if k == "relative_torsion")
    z[0, cb] = -z[0, cb]
    flipped = ic.flipped_centres(ic.inverse(z)[0])[0]
    assert flipped.sum() == 1
    centre = ic.chiral_centres[int(flipped.nonzero())]
    first_dihedral = ic.kinds.count("bond") + ic.kinds.count("angle")
    assert centre == ic.zmatrix.rows[3 + cb - first_dihedral].j
    if name == "aldp":
        assert [a.name for a in top.atoms()][centre] == "CA"


def test_cartesian_identity():
    box = np.array([[-1.0, 1.0], [-2.0, 2.0], [-0.5, 0.5]])
    cc = CartesianCoordinates(1, box)
    x = torch.randn(5, 1, 3, dtype=torch.float64)
    z, logdet = cc(x)
    assert z.shape == (5, 3) and torch.equal(logdet, torch.zeros(5, dtype=torch.float64))
    x2, logdet2 = cc.inverse(z)
    assert torch.equal(x2, x) and torch.equal(logdet2, torch.zeros(5, dtype=torch.float64))
    rot, t = cc.frame(x)
    assert torch.equal(x2 @ rot.transpose(1, 2) + t[:, None], x)
    assert cc.kinds == ["cartesian"] * 3 and not cc.circular_mask.any()
    assert torch.equal(cc.valid_bounds, torch.as_tensor(box)) and torch.equal(cc.reference_z, torch.zeros(3, dtype=torch.float64))
    assert not cc.chirality_flipped(x).any() and cc.flipped_fraction(x) == 0.0
    with pytest.raises(CMTInputError, match="box"):
        CartesianCoordinates(2, box)


def test_coordinates_for_project_targets(aldp):
    from cmt_openmm.systems import aldp_pdb_path, get_target
    from cmt_openmm.target import Target

    ic = coordinates_for(get_target("aldp-vacuum"))
    assert isinstance(ic, InternalCoordinates) and ic.dim == 60 and int(ic.circular_mask.sum()) == 7
    assert torch.equal(ic.reference_z, InternalCoordinates(*aldp).reference_z)
    constrained = Target.from_pdb(aldp_pdb_path(), ["amber99sbildn.xml"], 300.0, constraints=app.HBonds)
    assert coordinates_for(constrained).dim == 48
    cc = coordinates_for(get_target("toy-double-well"))
    assert isinstance(cc, CartesianCoordinates) and cc.dim == 3


def test_quantity_positions_accepted(aldp):
    top, pos = aldp
    ic = InternalCoordinates(top, unit.Quantity(pos * 10.0, unit.angstrom))
    assert torch.allclose(ic.reference_z, InternalCoordinates(top, pos).reference_z, atol=1e-12)


def test_coordinates_for_dispatches(ring):
    top, pos = ring
    mol = SimpleNamespace(has_molecule=True, topology=top, positions=pos, constraints=[],
                          n_atoms=18, box=None)
    assert isinstance(coordinates_for(mol), InternalCoordinates)
    ic32 = coordinates_for(mol, dtype=torch.float32)
    assert ic32.reference_z.dtype == torch.float32 and ic32.valid_bounds.dtype == torch.float32
    toy = SimpleNamespace(has_molecule=False, topology=None, positions=np.zeros((1, 3)), constraints=[],
                          n_atoms=1, box=np.array([[-1.0, 1.0]] * 3))
    cc = coordinates_for(toy)
    assert isinstance(cc, CartesianCoordinates) and cc.dim == 3


def test_torsions_about_ring_bonds_are_narrow_coordinates(ring):
    """In cyclohexane the ring bonds are the C-C bonds: a proper torsion about one is a narrow
    ring torsion, about any other bond a free circular torsion."""
    top, pos = ring
    ic = InternalCoordinates(top, pos)
    carbon = {a.index for a in top.atoms() if a.element.symbol == "C"}
    proper = [r for r in ic.zmatrix.rows[3:] if r.kind in ("torsion", "ring_torsion")]
    assert any(r.kind == "ring_torsion" for r in proper)
    for r in proper:
        assert (r.kind == "ring_torsion") == ({r.j, r.k} <= carbon), r
    dihedral_kinds = ic.kinds[-len(ic.zmatrix.rows[3:]):]
    assert [k == "torsion" for k in dihedral_kinds] == ic.circular_mask[-len(dihedral_kinds):].tolist()


def test_untrained_generator_keeps_proline_and_phenyl_rings_closed(tmp_path, monkeypatch):
    """Ring closures are not coordinates: with ring torsions free on the circle, samples of an
    untrained generator break the rings (median closure stretch 0.22-0.33 nm); as narrow
    coordinates around the reference the prior keeps them near closed (median ~0.03 nm)."""
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import peptide

    monkeypatch.setenv("CMT_OPENMM_CACHE", str(tmp_path))
    target = peptide("FP")
    generator = BoltzmannGenerator.build(target, n_layers=1, hidden=4)
    closures = generator.coordinates.zmatrix.ring_closures
    assert len(closures) == 2  # the phenyl ring and the proline ring
    x, _ = generator.sample(1000, torch.Generator().manual_seed(0))
    for a, b in closures:
        r0 = np.linalg.norm(target.positions[a] - target.positions[b])
        stretch = np.median(np.abs((x[:, a] - x[:, b]).norm(dim=-1).numpy() - r0))
        assert stretch < 0.06, f"ring closure {a}-{b}: median stretch {stretch:.3f} nm"
