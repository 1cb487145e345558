"""An OpenMM reporter that applies flow moves between MD steps of a plain ``Simulation`` and logs them."""
from __future__ import annotations

import os
import warnings

from ..errors import CMTInputError
from .moves import FlowIndependenceMove


SILENT_PROPOSALS = 500  # proposals all rejected before the reporter warns


class FlowMoveReporter:
    """An OpenMM reporter that applies flow moves every ``report_interval`` steps and logs them.

    Two lines added to an existing script::

        move = FlowIndependenceMove("generator.safetensors", n_steps=10)
        simulation.reporters.append(FlowMoveReporter(move, "flow_moves.csv", 1000))

    ``simulation.step(n)`` then attempts ``move.n_steps`` flow proposals after every
    ``report_interval`` MD steps. Each row: step, proposals and acceptances in the interval,
    the cumulative acceptance rate; once ``SILENT_PROPOSALS`` proposals have all been rejected, a
    warning says so (the moves then cost time and change nothing). With ``apply_moves=False`` it only logs a move that the
    script applies itself (``move.apply_to_simulation(simulation)``). ``temperature`` as in
    :meth:`FlowIndependenceMove.apply_to_simulation`.

    What other reporters see: at a step where several reporters are due, OpenMM fetches one
    ``State`` for all of them before calling any (``Simulation._generate_reports``), so a
    ``DCDReporter`` or ``StateDataReporter`` due at the same step writes the configuration from
    *before* this step's flow moves, wherever it stands in the list; reports at later steps see
    the moved chain. Both are states of the same exact chain. To record the configurations
    right after the flow moves, offset the other reporters' intervals, or call
    ``move.apply_to_simulation(simulation)`` between ``simulation.step`` calls yourself.

    Example (a toy and an untrained flow; the log goes to any file or open text stream):
        >>> import cmt_openmm, io, os, tempfile, openmm
        >>> from openmm import app
        >>> toy = cmt_openmm.get_target("toy-double-well")
        >>> bg = cmt_openmm.BoltzmannGenerator.build(toy, n_layers=2, hidden=8, bound=3.0)
        >>> move = cmt_openmm.FlowIndependenceMove(bg.save(os.path.join(tempfile.mkdtemp(), "toy.safetensors")),
        ...                                        n_steps=50, seed=0)
        >>> simulation = app.Simulation(toy.topology, toy.system, openmm.LangevinMiddleIntegrator(300, 1, 0.002),
        ...                             openmm.Platform.getPlatformByName("Reference"))
        >>> simulation.context.setPositions(toy.positions)
        >>> log = io.StringIO()
        >>> simulation.reporters.append(cmt_openmm.FlowMoveReporter(move, log, 100))
        >>> simulation.step(300)
        >>> rows = log.getvalue().splitlines()
        >>> rows[0]
        '#"Step","Flow proposals","Flow accepted","Acceptance rate (total)"'
        >>> [row.split(",")[:2] for row in rows[1:]], move.n_proposed
        ([['100', '50'], ['200', '50'], ['300', '50']], 150)
    """

    def __init__(self, move: FlowIndependenceMove, file, report_interval: int,
                 temperature=None, apply_moves: bool = True):
        if int(report_interval) < 1:
            raise CMTInputError(f"report_interval must be a positive number of steps, "
                                f"got {report_interval}.")
        self.move = move
        self.report_interval = int(report_interval)
        self.temperature = temperature
        self.apply_moves = apply_moves
        self._own_file = isinstance(file, (str, os.PathLike))
        self._out = open(file, "w") if self._own_file else file
        self._last = (move.n_proposed, move.n_accepted)
        self._warned = False
        print('#"Step","Flow proposals","Flow accepted","Acceptance rate (total)"',
              file=self._out, flush=True)

    def describeNextReport(self, simulation) -> dict:
        steps = self.report_interval - simulation.currentStep % self.report_interval
        return dict(steps=steps, periodic=None, include=[])

    def report(self, simulation, state) -> None:
        if self.apply_moves:
            self.move.apply_to_simulation(simulation, temperature=self.temperature)
        proposed, accepted = self.move.n_proposed, self.move.n_accepted
        rate = accepted / proposed if proposed else float("nan")
        print(f"{simulation.currentStep},{proposed - self._last[0]},{accepted - self._last[1]},"
              f"{rate:.4f}", file=self._out, flush=True)
        self._last = (proposed, accepted)
        if accepted == 0 and proposed >= SILENT_PROPOSALS and not self._warned:
            self._warned = True
            warnings.warn(f"none of the {proposed:,} flow proposals so far was accepted: the generator does not "
                          f"propose the states this simulation visits (a generator trained too briefly, or for "
                          f"another system or temperature), so the moves cost time and change nothing; check it "
                          f"with cmt-openmm evaluate and train it further.", stacklevel=2)

    def close(self) -> None:
        """Close the file when the reporter opened it."""
        if getattr(self, "_own_file", False) and not self._out.closed:
            self._out.close()

    def __del__(self):
        self.close()
