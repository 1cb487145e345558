"""FlowIndependenceMove: acceptance rule, rejections, velocities, serialisation, samplers, OpenMM.

Most tests use the stand-in Gaussian proposal of ``test_moves_exactness`` on one particle in
a harmonic well, where an exact proposal must be accepted every time; the tests at the end
use a real (untrained) BoltzmannGenerator on alanine dipeptide.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
import yaml
from openmm import unit
from openmmtools import cache, mcmc, multistate, states, utils

from cmt_openmm import generator as generator_module
from cmt_openmm.generator import load_generator
from cmt_openmm.errors import CMTInputError
from helpers import random_rotation
from cmt_openmm.sampling.moves import FlowIndependenceMove
from cmt_openmm.sampling.reporters import FlowMoveReporter
from test_moves_exactness import GaussianProposal

R = 0.00831446261815324  # kJ/(mol K)
SIGMA = 0.1  # nm, width of the harmonic well at 300 K


def harmonic_system(expression: str | None = None) -> tuple[openmm.System, app.Topology]:
    """One particle, U = kT(300 K) |x|^2 / (2 SIGMA^2): Boltzmann at 300 K is N(0, SIGMA^2 I)."""
    system = openmm.System()
    system.addParticle(12.0)
    k = R * 300.0 / SIGMA**2
    force = openmm.CustomExternalForce(expression or f"0.5*{k}*(x^2+y^2+z^2)")
    force.addParticle(0, [])
    system.addForce(force)
    topology = app.Topology()
    topology.addAtom("P", app.element.carbon, topology.addResidue("TOY", topology.addChain()))
    return system, topology


def reference_cache() -> cache.ContextCache:
    return cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))


def exact_proposal(temperature: float = 300.0) -> GaussianProposal:
    return GaussianProposal(1, [[0.0, 0.0, 0.0]], SIGMA * math.sqrt(temperature / 300.0))


def start_state() -> states.SamplerState:
    return states.SamplerState(np.array([[0.05, -0.02, 0.01]]) * unit.nanometer)


class Flipped(GaussianProposal):
    def chirality_flipped(self, x):
        return torch.ones(len(x), dtype=torch.bool)


# ------------------------------------------------------------------ the acceptance rule
@pytest.mark.parametrize("temperature", [300.0, 600.0])
def test_exact_proposal_is_always_accepted_at_the_state_temperature(temperature):
    system, _ = harmonic_system()
    thermo = states.ThermodynamicState(system, temperature * unit.kelvin)
    move = FlowIndependenceMove(exact_proposal(temperature), n_steps=50, batch_size=16, seed=0)
    sampler_state = start_state()
    move.apply(thermo, sampler_state, context_cache=reference_cache())
    assert move.statistics["n_proposed"] == 50 and move.statistics["n_accepted"] == 50
    # the same proposal at another temperature is not exact there: some rejections
    other = 900.0 - temperature
    wrong = FlowIndependenceMove(exact_proposal(temperature), n_steps=50, batch_size=16, seed=0)
    wrong.apply(states.ThermodynamicState(system, other * unit.kelvin), start_state(),
                context_cache=reference_cache())
    assert 0 < wrong.n_accepted < 50


def test_batches_are_consumed_lazily():
    system, _ = harmonic_system()
    thermo = states.ThermodynamicState(system, 300 * unit.kelvin)
    proposal = exact_proposal()
    calls = []
    original = proposal.sample
    proposal.sample = lambda n, generator=None: calls.append(n) or original(n, generator)
    move = FlowIndependenceMove(proposal, n_steps=3, batch_size=8, seed=0)
    sampler_state, context_cache = start_state(), reference_cache()
    for _ in range(5):
        move.apply(thermo, sampler_state, context_cache=context_cache)
    assert calls == [8, 8] and move.n_proposed == 15


def test_flipped_chirality_is_rejected_and_counted():
    system, _ = harmonic_system()
    move = FlowIndependenceMove(Flipped(1, [[0.0, 0.0, 0.0]], SIGMA), n_steps=20, seed=0)
    sampler_state = start_state()
    before = sampler_state.positions.copy()
    move.apply(states.ThermodynamicState(system, 300 * unit.kelvin), sampler_state,
               context_cache=reference_cache())
    assert move.statistics == dict(n_proposed=20, n_accepted=0, n_chirality_rejected=20,
                                   n_energy_failed=0, n_log_q_failed=0)
    assert np.array_equal(sampler_state.positions, before)


def test_failed_energies_are_rejected_and_counted():
    system, _ = harmonic_system("sqrt(x) + 0*y*z")  # NaN for x < 0
    proposal = GaussianProposal(1, [[-1.0, 0.0, 0.0]], 0.01)  # always x < 0
    move = FlowIndependenceMove(proposal, n_steps=10, seed=0)
    sampler_state = states.SamplerState(np.array([[0.5, 0.0, 0.0]]) * unit.nanometer)
    move.apply(states.ThermodynamicState(system, 300 * unit.kelvin), sampler_state,
               context_cache=reference_cache())
    assert move.n_energy_failed == 10 and move.n_accepted == 0
    assert sampler_state.positions[0, 0] == 0.5 * unit.nanometer


def test_velocities_are_redrawn_only_after_acceptance():
    system, _ = harmonic_system()
    thermo = states.ThermodynamicState(system, 300 * unit.kelvin)
    sampler_state = start_state()
    sampler_state.velocities = np.array([[1.0, 2.0, 3.0]]) * unit.nanometer / unit.picosecond
    rejecting = FlowIndependenceMove(Flipped(1, [[0.0, 0.0, 0.0]], SIGMA), n_steps=3, seed=0)
    rejecting.apply(thermo, sampler_state, context_cache=reference_cache())
    assert np.allclose(sampler_state.velocities.value_in_unit(unit.nanometer / unit.picosecond),
                       [[1.0, 2.0, 3.0]])
    accepting = FlowIndependenceMove(exact_proposal(), n_steps=3, seed=0)
    accepting.apply(thermo, sampler_state, context_cache=reference_cache())
    v = sampler_state.velocities.value_in_unit(unit.nanometer / unit.picosecond)
    assert np.isfinite(v).all() and not np.allclose(v, [[1.0, 2.0, 3.0]])
    energy = sampler_state.potential_energy.value_in_unit(unit.kilojoule_per_mole)
    x = sampler_state.positions.value_in_unit(unit.nanometer)
    assert energy == pytest.approx(0.5 * R * 300.0 / SIGMA**2 * (x**2).sum())


def test_wrong_number_of_particles_is_refused():
    system, _ = harmonic_system()
    move = FlowIndependenceMove(GaussianProposal(2, [[0.0] * 3] * 2, SIGMA), seed=0)
    with pytest.raises(CMTInputError, match="particles"):
        move.apply(states.ThermodynamicState(system, 300 * unit.kelvin), start_state(),
                   context_cache=reference_cache())


def test_bad_settings_are_refused():
    with pytest.raises(CMTInputError):
        FlowIndependenceMove(exact_proposal(), n_steps=0)


# ------------------------------------------------------------------ statistics and copies
def test_statistics_setter_and_sequence_move():
    move = FlowIndependenceMove(exact_proposal(), seed=0)
    move.statistics = dict(n_proposed=7, n_accepted=3)
    assert move.statistics == dict(n_proposed=7, n_accepted=3, n_chirality_rejected=0,
                                   n_energy_failed=0, n_log_q_failed=0)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=2), move])
    assert sequence.statistics[1]["n_accepted"] == 3
    move.reset_statistics()
    assert move.n_proposed == 0


def test_deepcopy_shares_the_generator_but_not_the_random_stream():
    move = FlowIndependenceMove(exact_proposal(), seed=5)
    move.statistics = dict(n_proposed=4, n_accepted=2)
    twin, triplet = copy.deepcopy(move), copy.deepcopy(move)
    assert twin.generator is move.generator and twin.statistics == move.statistics
    draws = [m._proposals.pop(m._rng)[0].tolist() for m in (move, twin, triplet)]
    assert draws[0] != draws[1] != draws[2] != draws[0]
    # copies are reproducible from the seed
    again = copy.deepcopy(FlowIndependenceMove(exact_proposal(), seed=5))
    assert again._rng.random() == copy.deepcopy(FlowIndependenceMove(exact_proposal(), seed=5))._rng.random()


def test_unsaved_generator_cannot_be_serialised_until_saved(tmp_path):
    move = FlowIndependenceMove(exact_proposal(), seed=0)
    with pytest.raises(CMTInputError, match="never saved"):
        utils.serialize(move)
    move.save_generator(tmp_path / "g.json")
    assert move.generator_path == str(tmp_path / "g.json")
    assert utils.serialize(move)["generator"]["path"] == str(tmp_path / "g.json")


def _yaml_round_trip(obj):
    """What MultiStateReporter does to a move: serialise, YAML text, back."""
    text = yaml.dump(utils.serialize(obj), Dumper=multistate.multistatereporter._DictYamlDumper)
    return utils.deserialize(yaml.load(text, Loader=multistate.multistatereporter._DictYamlLoader))


def test_serialisation_round_trip_keeps_settings_and_statistics(tmp_path):
    system, _ = harmonic_system()
    thermo = states.ThermodynamicState(system, 600 * unit.kelvin)
    proposal = exact_proposal()
    proposal.save(tmp_path / "g.json")
    twins = [FlowIndependenceMove(proposal, n_steps=4, batch_size=8, seed=3,
                                  generator_path=tmp_path / "g.json") for _ in range(2)]
    for move in twins:
        move.apply(thermo, start_state(), context_cache=reference_cache())
    restored = [_yaml_round_trip(move) for move in twins]
    assert isinstance(restored[0], FlowIndependenceMove)
    assert (restored[0].n_steps, restored[0].batch_size, restored[0].seed) == (4, 8, 3)
    assert restored[0].statistics == twins[0].statistics
    assert restored[1].generator is restored[0].generator  # loaded once per process
    # the restored stream is new but reproducible: equal seeds, equal histories, equal chains
    a, b = start_state(), start_state()
    restored[0].apply(thermo, a, context_cache=reference_cache())
    restored[1].apply(thermo, b, context_cache=reference_cache())
    assert np.array_equal(a.positions, b.positions)
    assert restored[0].statistics == restored[1].statistics


def test_changed_generator_file_is_refused_on_load(tmp_path, monkeypatch):
    path = tmp_path / "g.json"
    exact_proposal().save(path)
    move = FlowIndependenceMove(GaussianProposal.load(path), generator_path=path, seed=0)
    state = utils.serialize(move)
    GaussianProposal(1, [[0.1, 0.0, 0.0]], SIGMA).save(path)
    monkeypatch.setattr(generator_module, "_LOADED", {})
    monkeypatch.setattr(generator_module, "_FILE_HASH", {})
    with pytest.raises(CMTInputError, match="changed"):
        utils.deserialize(state)
    with pytest.raises(CMTInputError, match="differs"):
        FlowIndependenceMove(exact_proposal(), generator_path=path)


# ------------------------------------------------------------------ openmmtools samplers
def test_mcmc_sampler_with_langevin_and_flow_moves():
    system, _ = harmonic_system()
    thermo = states.ThermodynamicState(system, 300 * unit.kelvin)
    flow = FlowIndependenceMove(exact_proposal(), n_steps=2, seed=0)
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=5), flow])
    sampler = mcmc.MCMCSampler(thermo, start_state(), move=sequence)
    sampler.run(n_iterations=3)
    assert sequence.statistics[1]["n_proposed"] == 6 and sequence.statistics[1]["n_accepted"] == 6


def test_replica_exchange_with_storage_and_resume(tmp_path):
    system, _ = harmonic_system()
    proposal = exact_proposal(450.0)
    proposal.save(tmp_path / "g.json")
    flow = FlowIndependenceMove(proposal, n_steps=3, batch_size=4, seed=1,
                                generator_path=tmp_path / "g.json")
    move = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=5), flow])
    thermo = [states.ThermodynamicState(system, t * unit.kelvin) for t in (300.0, 450.0)]
    storage = str(tmp_path / "re.nc")
    sampler = multistate.ReplicaExchangeSampler(mcmc_moves=move, number_of_iterations=3)
    sampler.energy_context_cache = reference_cache()
    sampler.sampler_context_cache = reference_cache()
    reporter = multistate.MultiStateReporter(storage, checkpoint_interval=1)
    sampler.create(thermo, [start_state(), start_state()], storage=reporter)
    sampler.run()
    flows = [m.move_list[1] for m in sampler._mcmc_moves]
    assert [f.n_proposed for f in flows] == [9, 9]
    # replicas never share proposals: their proposal batches differ
    batches = [f._proposals._x for f in flows]
    assert batches[0].shape == batches[1].shape and not np.allclose(batches[0], batches[1])
    stats = [f.statistics for f in flows]
    del sampler
    reporter.close()

    resumed = multistate.ReplicaExchangeSampler.from_storage(storage)
    assert resumed.iteration == 3
    restored = [m.move_list[1] for m in resumed._mcmc_moves]
    assert [f.statistics for f in restored] == stats
    resumed.energy_context_cache = reference_cache()
    resumed.sampler_context_cache = reference_cache()
    resumed.extend(2)
    assert [m.move_list[1].n_proposed for m in resumed._mcmc_moves] == [15, 15]
    resumed._reporter.close()


# ------------------------------------------------------------------ plain OpenMM
def make_simulation(integrator=None) -> app.Simulation:
    system, topology = harmonic_system()
    integrator = integrator or openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                                 2 * unit.femtosecond)
    simulation = app.Simulation(topology, system, integrator,
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(np.array([[0.05, 0.0, 0.0]]))
    return simulation


def test_apply_to_simulation_uses_the_integrator_temperature():
    simulation = make_simulation()
    move = FlowIndependenceMove(exact_proposal(), n_steps=5, seed=0)
    simulation.step(10)
    assert move.apply_to_simulation(simulation) == dict(n_proposed=5, n_accepted=5)
    with pytest.raises(CMTInputError, match="differs"):
        move.apply_to_simulation(simulation, temperature=900 * unit.kelvin)
    simulation.integrator.setTemperature(900 * unit.kelvin)
    assert move.apply_to_simulation(simulation, n_steps=20)["n_accepted"] < 20
    x = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    assert np.isfinite(x.value_in_unit(unit.nanometer)).all()
    simulation.step(10)


def test_apply_to_simulation_needs_a_temperature_for_verlet():
    simulation = make_simulation(openmm.VerletIntegrator(1 * unit.femtosecond))
    move = FlowIndependenceMove(exact_proposal(), seed=0)
    with pytest.raises(CMTInputError, match="temperature"):
        move.apply_to_simulation(simulation)
    assert move.apply_to_simulation(simulation, temperature=300.0)["n_accepted"] == 1


def test_reporter_applies_moves_and_logs_acceptance(tmp_path):
    simulation = make_simulation()
    move = FlowIndependenceMove(exact_proposal(), n_steps=2, seed=0)
    simulation.reporters.append(FlowMoveReporter(move, str(tmp_path / "flow.csv"), 10))
    simulation.step(50)
    simulation.reporters[0].close()
    rows = (tmp_path / "flow.csv").read_text().splitlines()
    assert rows[0].startswith("#") and len(rows) == 6
    assert rows[-1].split(",") == ["50", "2", "2", "1.0000"]
    assert move.n_proposed == 10


def test_reporter_can_log_a_move_applied_by_the_script(tmp_path):
    simulation = make_simulation()
    move = FlowIndependenceMove(exact_proposal(), n_steps=1, seed=0)
    with open(tmp_path / "log.csv", "w") as f:
        simulation.reporters.append(FlowMoveReporter(move, f, 5, apply_moves=False))
        for _ in range(2):
            simulation.step(5)
            move.apply_to_simulation(simulation)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["0", "1"]


class OutsideSupport(GaussianProposal):
    """Proposals whose log q is -inf (outside the flow's support)."""

    def sample(self, n, generator=None):
        x, log_q = super().sample(n, generator)
        return x, torch.full_like(log_q, -math.inf)


def test_proposals_outside_the_support_are_counted_as_such_without_an_energy():
    system, _ = harmonic_system("sqrt(x) + 0*y*z")  # an energy evaluation would fail (x < 0)
    move = FlowIndependenceMove(OutsideSupport(1, [[-1.0, 0.0, 0.0]], 0.01), n_steps=4, seed=0)
    move.apply(states.ThermodynamicState(system, 300 * unit.kelvin),
               states.SamplerState(np.array([[0.5, 0.0, 0.0]]) * unit.nanometer), context_cache=reference_cache())
    assert move.statistics == dict(n_proposed=4, n_accepted=0, n_chirality_rejected=0, n_energy_failed=0,
                                   n_log_q_failed=4)


def test_nan_positions_are_refused_in_one_sentence():
    simulation = make_simulation()
    simulation.context.setPositions(np.array([[np.nan, 0.0, 0.0]]))
    with pytest.raises(CMTInputError, match="NaN or inf"):
        FlowIndependenceMove(exact_proposal(), seed=0).apply_to_simulation(simulation)


def test_apply_to_simulation_uses_only_the_integrated_force_groups():
    """A force the integrator does not integrate (group 1) is not part of the chain's target:
    with it counted, the exact proposal would be rejected almost always."""
    system, topology = harmonic_system()
    wall = openmm.CustomExternalForce("1e4*(x^2+y^2+z^2)")
    wall.addParticle(0, [])
    wall.setForceGroup(1)
    system.addForce(wall)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 2 * unit.femtosecond)
    integrator.setIntegrationForceGroups({0})
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(np.array([[0.05, 0.0, 0.0]]))
    move = FlowIndependenceMove(exact_proposal(), n_steps=20, seed=0)
    assert move.apply_to_simulation(simulation) == dict(n_proposed=20, n_accepted=20)


def test_moves_on_different_mpi_ranks_use_different_streams(monkeypatch):
    from cmt_openmm.sampling import moves

    draws = []
    for rank in (0, 1, 0):
        monkeypatch.setattr(moves, "_mpi_rank", lambda rank=rank: rank)
        draws.append(FlowIndependenceMove(exact_proposal(), seed=3)._rng.random())
    assert draws[0] == draws[2] != draws[1]


def test_a_dcd_reporter_due_at_the_same_step_writes_the_state_before_the_flow_moves(tmp_path):
    """As FlowMoveReporter documents: OpenMM fetches one State for all reporters due at a step."""
    import mdtraj

    simulation = make_simulation()
    _, topology = harmonic_system()
    move = FlowIndependenceMove(exact_proposal(), n_steps=1, seed=0)  # exact: always accepted
    simulation.reporters.append(FlowMoveReporter(move, str(tmp_path / "flow.csv"), 10))
    simulation.reporters.append(app.DCDReporter(str(tmp_path / "x.dcd"), 10))
    simulation.step(9)
    before = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    simulation.step(1)
    after = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    simulation.reporters[1]._out.close()
    frame = mdtraj.load_dcd(str(tmp_path / "x.dcd"), top=mdtraj.Topology.from_openmm(topology)).xyz[0]
    assert move.n_accepted == 1 and not np.allclose(frame, after, atol=1e-3)
    assert np.abs(frame - before).max() < 0.05  # one MD step (2 fs) from `before`, far from the flow sample


# ------------------------------------------------------------------ constraints
@pytest.fixture(scope="module")
def aldp_hbonds():
    """ALDP with HBonds constraints, its generator, and the unconstrained System."""
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import aldp_pdb_path, get_target
    from cmt_openmm.target import Target

    constrained = Target.from_pdb(aldp_pdb_path(), ["amber99sbildn.xml", "amber99_obc.xml"], 300.0,
                                  constraints=app.HBonds)
    plain = get_target("aldp-obc")
    return (constrained, BoltzmannGenerator.build(constrained, n_layers=1, hidden=4),
            plain, BoltzmannGenerator.build(plain, n_layers=1, hidden=4))


@pytest.mark.parametrize("generator_constrained", [True, False], ids=["HBonds-generator", "plain-generator"])
def test_generator_and_system_with_other_constraints_are_refused(aldp_hbonds, generator_constrained):
    constrained, constrained_generator, plain, plain_generator = aldp_hbonds
    generator, system_target = ((constrained_generator, plain) if generator_constrained
                                else (plain_generator, constrained))
    move = FlowIndependenceMove(generator, n_steps=2, seed=0)
    simulation = app.Simulation(system_target.topology, system_target.system,
                                openmm.LangevinMiddleIntegrator(300, 1, 0.001),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(system_target.positions)
    with pytest.raises(CMTInputError, match="distance constraints"):
        move.apply_to_simulation(simulation)
    with pytest.raises(CMTInputError, match="distance constraints"):
        move.apply(states.ThermodynamicState(system_target.system, 300 * unit.kelvin),
                   states.SamplerState(system_target.positions * unit.nanometer), context_cache=reference_cache())
    assert move.n_proposed == 0


def test_a_system_of_another_size_is_refused_for_its_atoms_before_its_constraints(aldp_hbonds):
    from cmt_openmm.systems import get_target

    ala4 = get_target("ala4-hbonds")  # 42 atoms, 22 constraints; the generator is ALDP's (22 atoms, none)
    move = FlowIndependenceMove(aldp_hbonds[3], n_steps=2, seed=0)
    simulation = app.Simulation(ala4.topology, ala4.system, openmm.LangevinMiddleIntegrator(300, 1, 0.002),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(ala4.positions)
    with pytest.raises(CMTInputError, match="The System has 42 particles but the generator was built for 22"):
        move.apply_to_simulation(simulation)


def test_a_constrained_generator_in_a_constrained_simulation_keeps_the_constraints(aldp_hbonds):
    constrained, generator, _, _ = aldp_hbonds
    move = FlowIndependenceMove(generator, n_steps=50, batch_size=50, seed=0)
    simulation = app.Simulation(constrained.topology, constrained.system,
                                openmm.LangevinMiddleIntegrator(300, 1, 0.002),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(constrained.positions)
    simulation.step(10)
    move.apply_to_simulation(simulation)
    assert move.n_proposed == 50
    x = simulation.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    for i, j, length in constrained.constraints:
        assert abs(np.linalg.norm(x[i] - x[j]) - length) < 1e-4 * length


# ------------------------------------------------------------------ a real generator (alanine dipeptide)
@pytest.fixture(scope="module")
def aldp():
    from cmt_openmm.generator import BoltzmannGenerator
    from cmt_openmm.systems import get_target

    target = get_target("aldp-vacuum")
    return target, BoltzmannGenerator.build(target, n_layers=2, hidden=16, n_bins=4, seed=0)


def posed(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """x under a random proper rotation and a shift."""
    return x @ random_rotation(seed).T + np.array([1.0, -2.0, 0.5])


def test_proposals_are_placed_in_the_frame_of_the_current_configuration(aldp):
    target, generator = aldp
    move = FlowIndependenceMove(generator, batch_size=8, seed=0)
    x = posed(target.positions)
    seen = []
    move._run(x, 0.0, lambda p: seen.append(p) or 0.0, 6)
    frame = generator.coordinates.frame(torch.as_tensor(x[None]))
    for p in seen:
        rotation, shift = generator.coordinates.frame(torch.as_tensor(p[None]))
        assert torch.allclose(rotation, frame[0], atol=1e-8) and torch.allclose(shift, frame[1], atol=1e-8)
    # log q of the placed proposals (inverse pass) is the log q the flow reported when sampling
    buffered = move._proposals._log_q[~move._proposals._flipped][:len(seen)]
    with torch.no_grad():
        log_q = generator.log_prob(torch.as_tensor(np.stack(seen))).numpy()
    assert len(seen) >= 4 and np.allclose(log_q, buffered, atol=1e-3)


def test_aldp_move_in_openmmtools_and_simulation(aldp, tmp_path):
    target, generator = aldp
    path = tmp_path / "aldp.safetensors"
    generator.save(path)
    move = FlowIndependenceMove(str(path), n_steps=5, batch_size=8, seed=0)
    assert move.generator_path == str(path) and move.generator.n_atoms == 22
    sequence = mcmc.SequenceMove([mcmc.LangevinDynamicsMove(n_steps=10), move])
    clone = copy.deepcopy(sequence)  # through __getstate__/__setstate__: finds the file again
    assert clone.move_list[1].generator is load_generator(path, move._hash)
    thermo = states.ThermodynamicState(target.system, 300 * unit.kelvin)
    sampler_state = states.SamplerState(posed(target.positions) * unit.nanometer)
    start = sampler_state.positions.value_in_unit(unit.nanometer).copy()
    clone.apply(thermo, sampler_state, context_cache=reference_cache())
    stats = clone.move_list[1].statistics
    assert stats["n_proposed"] == 5
    # the sampler state holds the chain's state: the Langevin steps moved it, and its stored
    # energy is the OpenMM energy of its positions (also after a flow move, accepted or not)
    after = sampler_state.positions.value_in_unit(unit.nanometer)
    assert not np.allclose(after, start)
    context = openmm.Context(target.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(after)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert sampler_state.potential_energy.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(energy, rel=1e-6)

    simulation = app.Simulation(target.topology, target.system,
                                openmm.LangevinMiddleIntegrator(300, 1, 0.001),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(target.positions)
    simulation.reporters.append(FlowMoveReporter(move, str(tmp_path / "flow.csv"), 5))
    simulation.step(20)
    assert move.n_proposed == 4 * 5


def test_the_reporter_warns_once_when_every_flow_proposal_is_rejected():
    """A generator that never proposes the simulation's states makes moves that change nothing: the
    user hears it once, after SILENT_PROPOSALS proposals, and not while some are accepted."""
    import io
    import types
    import warnings

    from cmt_openmm.sampling.reporters import SILENT_PROPOSALS, FlowMoveReporter

    def run(accepted_per_report):
        move = types.SimpleNamespace(n_proposed=0, n_accepted=0)
        reporter = FlowMoveReporter(move, io.StringIO(), 10, apply_moves=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 2 * SILENT_PROPOSALS // 100 + 1):
                move.n_proposed += 100
                move.n_accepted += accepted_per_report
                reporter.report(types.SimpleNamespace(currentStep=10 * step), None)
        return [str(w.message) for w in caught]

    rejected = run(0)
    assert len(rejected) == 1 and rejected[0].startswith(f"none of the {SILENT_PROPOSALS:,} flow proposals")
    assert run(1) == []
