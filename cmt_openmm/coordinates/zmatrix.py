"""Z-matrix (placement order of atoms by bond, angle and torsion) built from a bond graph.

Hand-written because the Z-matrix must come from any molecule's bond graph automatically
(rings included) and must follow the sibling/relative-torsion convention that keeps chiral
centres fixed; the published Boltzmann-generator code ships hand-written per-molecule tables.

Conventions (see :func:`build_zmatrix`):

* Seeds ``a0, a1, a2``: ``a0`` is a heavy atom with many heavy neighbours (capped at 3) and
  the smallest graph eccentricity (for peptides: a central CA); ``a1`` and ``a2`` are two of
  its neighbours (heavy, well connected first).  ``a1`` and ``a2`` are both bonded to ``a0``.
* The other atoms follow a breadth-first spanning tree from the seeds: each atom ``i`` has a
  parent ``j`` (a bonded, earlier atom) and an axis atom ``k`` (``j``'s parent; ``a1`` when
  ``j`` is ``a0``).  Ring-closure bonds are not tree bonds and are no coordinates.
* The first child of ``j`` gets a proper torsion ``i-j-k-l`` (``l`` = ``k``'s parent, or the
  seed not equal to ``j`` when ``k`` is ``a0``), circular.  Every later child of ``j`` gets a
  *relative torsion* ``i-j-k-s`` with ``s`` the first child (for ``j == a0``: ``s = a2``):
  the azimuth of ``i`` around the ``j-k`` axis minus that of ``s``, about +-2.1 rad on a
  tetrahedral centre and about pi on a planar one.  Its sign fixes the chirality at ``j``.
* A proper torsion about a ring bond (a bond on a cycle of the graph, e.g. inside a phenyl or
  the proline ring, or proline's N-CA) is a *ring torsion*: ring closure keeps it near its
  reference value, so it is a narrow interval coordinate, not a free circular one.
* Chiral centres are the atoms with exactly four neighbours; the chirality of each is the
  sign of the signed volume of three neighbours ``(k, s, i)`` where ``i`` is the first child
  with a relative torsion, so keeping that relative torsion's sign keeps the chirality.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..errors import CMTInputError

TORSION = "torsion"
RELATIVE = "relative_torsion"
RING = "ring_torsion"


@dataclass(frozen=True)
class ZRow:
    """Placement of one atom: ``atom`` is bonded to ``j``, angle ``atom-j-k``, dihedral ``atom-j-k-l``.

    ``kind`` is ``None`` for the seeds ``a1``/``a2`` (no dihedral), ``"torsion"``,
    ``"ring_torsion"`` (a torsion about a ring bond) or ``"relative_torsion"``.  For a relative torsion the measured coordinate is the dihedral
    ``atom-j-k-sibling`` and the placement dihedral w.r.t. ``l`` is that value plus the
    sibling's torsion (``sibling == l`` for children of ``a0``, whose offset is zero).
    """

    atom: int
    j: int = -1
    k: int = -1
    l: int = -1
    kind: str | None = None
    sibling: int = -1
    generation: int = 0


@dataclass(frozen=True)
class ZMatrix:
    """Rows in placement order (``rows[0]`` is ``a0``); placement generations are contiguous.

    ``chiral`` lists ``(centre, a, b, c)``: the reference chirality is the sign of
    ``det[x_a - x_c0, x_b - x_c0, x_c - x_c0]`` (``c0`` the centre).
    ``ring_closures`` are the bonds that are not in the spanning tree (no coordinates).
    """

    rows: tuple[ZRow, ...]
    chiral: tuple[tuple[int, int, int, int], ...]
    ring_closures: tuple[tuple[int, int], ...]

    @property
    def seeds(self) -> tuple[int, int, int]:
        return self.rows[0].atom, self.rows[1].atom, self.rows[2].atom


def _neighbours(n_atoms: int, bonds) -> list[list[int]]:
    nbrs: list[set[int]] = [set() for _ in range(n_atoms)]
    for a, b in bonds:
        a, b = int(a), int(b)
        if not (0 <= a < n_atoms and 0 <= b < n_atoms) or a == b:
            raise CMTInputError(f"Bond ({a}, {b}) does not join two different atoms of the "
                                f"{n_atoms}-atom topology; fix the topology's bonds.")
        nbrs[a].add(b)
        nbrs[b].add(a)
    return [sorted(s) for s in nbrs]


def _distances(nbrs: list[list[int]], source: int) -> list[int]:
    dist = [-1] * len(nbrs)
    dist[source] = 0
    queue = deque([source])
    while queue:
        a = queue.popleft()
        for b in nbrs[a]:
            if dist[b] < 0:
                dist[b] = dist[a] + 1
                queue.append(b)
    return dist


def _ring_bonds(nbrs: list[list[int]]) -> set[frozenset[int]]:
    """Bonds that lie on a cycle (those whose removal leaves their atoms connected)."""
    rings = set()
    for a, bs in enumerate(nbrs):
        for b in bs:
            if a < b:
                seen, queue = {a}, deque([a])
                while queue and b not in seen:
                    c = queue.popleft()
                    for d in nbrs[c]:
                        if d not in seen and not (c == a and d == b):
                            seen.add(d)
                            queue.append(d)
                if b in seen:
                    rings.add(frozenset((a, b)))
    return rings


def _choose_seeds(nbrs, is_h) -> tuple[int, int, int]:
    heavy_deg = [sum(not is_h[b] for b in nb) for nb in nbrs]
    candidates = [a for a in range(len(nbrs)) if len(nbrs[a]) >= 2]
    heavy = [a for a in candidates if not is_h[a]]
    candidates = heavy or candidates
    ecc = {a: max(_distances(nbrs, a)) for a in candidates}
    a0 = min(candidates, key=lambda a: (-min(heavy_deg[a], 3), ecc[a], -len(nbrs[a]), a))
    ranked = sorted(nbrs[a0], key=lambda b: (is_h[b], -heavy_deg[b], b))
    return a0, ranked[0], ranked[1]


def build_zmatrix(n_atoms: int, bonds, is_hydrogen, seeds: tuple[int, int, int] | None = None) -> ZMatrix:
    """Breadth-first Z-matrix of a connected molecule (conventions in the module docstring).

    ``bonds``: iterable of atom-index pairs; ``is_hydrogen``: one bool per atom (hydrogens
    are placed after heavy atoms among siblings and never seed); ``seeds``: optional
    ``(a0, a1, a2)`` with ``a1`` and ``a2`` bonded to ``a0``.
    """
    if n_atoms < 3:
        raise CMTInputError(f"Internal coordinates need at least 3 atoms, got {n_atoms}; "
                            "use CartesianCoordinates for smaller systems.")
    nbrs = _neighbours(n_atoms, bonds)
    is_h = [bool(h) for h in is_hydrogen]
    n_reached = sum(d >= 0 for d in _distances(nbrs, 0))
    if n_reached != n_atoms:
        raise CMTInputError(f"The bond graph is not connected ({n_atoms - n_reached} of {n_atoms} "
                            "atoms are not bonded to atom 0); internal coordinates need one "
                            "molecule, so add the missing bonds or use CartesianCoordinates.")
    if seeds is None:
        seeds = _choose_seeds(nbrs, is_h)
    a0, a1, a2 = (int(s) for s in seeds)
    if len({a0, a1, a2}) != 3 or a1 not in nbrs[a0] or a2 not in nbrs[a0]:
        raise CMTInputError(f"Seed atoms {seeds} are invalid; give three distinct atoms "
                            "(a0, a1, a2) with a1 and a2 both bonded to a0.")
    heavy_deg = [sum(not is_h[b] for b in nb) for nb in nbrs]

    parent = {a1: a0, a2: a0}
    children: dict[int, list[int]] = {a: [] for a in range(n_atoms)}
    children[a0] = [a2]  # a2 is a0's reference child for the azimuth around the a0-a1 axis
    bfs = [a0, a1, a2]
    placed = set(bfs)
    queue = deque(bfs)
    while queue:
        j = queue.popleft()
        for i in sorted((b for b in nbrs[j] if b not in placed),
                        key=lambda b: (is_h[b], -heavy_deg[b], b)):
            placed.add(i)
            parent[i] = j
            children[j].append(i)
            bfs.append(i)
            queue.append(i)

    def axis(j: int) -> int:
        return a1 if j == a0 else parent[j]

    ring_bonds = _ring_bonds(nbrs)
    rows = {a0: ZRow(a0), a1: ZRow(a1, j=a0), a2: ZRow(a2, j=a0, k=a1)}
    generation = {a0: 0, a1: 0, a2: 0}
    for i in bfs[3:]:
        j = parent[i]
        k = axis(j)
        first = children[j][0]
        if k == a0:
            l = a2 if j == a1 else a1
        else:
            l = parent[k]
        if j == a0:
            kind, sibling, l = RELATIVE, a2, a2
        elif i == first:
            kind, sibling = (RING if frozenset((j, k)) in ring_bonds else TORSION), -1
        else:
            kind, sibling = RELATIVE, first
        generation[i] = 1 + max(generation[j], generation[k], generation[l])
        rows[i] = ZRow(i, j, k, l, kind, sibling, generation[i])
    ordered = [rows[a0], rows[a1], rows[a2]] + sorted(
        (rows[i] for i in bfs[3:]), key=lambda r: r.generation)

    chiral = []
    for c in range(n_atoms):
        if len(nbrs[c]) != 4:
            continue
        rel = [i for i in children[c] if rows[i].kind == RELATIVE]
        if rel:
            r = rows[rel[0]]
            chiral.append((c, r.k, r.sibling, r.atom))
        else:
            chiral.append((c, *nbrs[c][:3]))
    tree = {frozenset((i, p)) for i, p in parent.items()}
    closures = sorted({tuple(sorted((a, b))) for a in range(n_atoms) for b in nbrs[a]
                       if frozenset((a, b)) not in tree})
    return ZMatrix(tuple(ordered), tuple(chiral), tuple(closures))
