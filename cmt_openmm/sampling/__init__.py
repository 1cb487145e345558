"""Using a trained generator: reweighted ensembles, their estimators, MCMC moves, reference MD.

- :mod:`.reweighting`: :func:`reweight` and :class:`ReweightedEnsemble` (weights, export);
- :mod:`.ensemble_weights`: what the log-weights alone give (ESS, reliability, resampling indices,
  weights-only ensembles) and :class:`LowESSWarning`, the base class of :class:`ReweightedEnsemble`;
- :mod:`.estimators`: expectations with error bars, basin populations and free energies, FES;
- :mod:`.moves`: :class:`FlowIndependenceMove` for openmmtools samplers and ``Simulation`` s;
- :mod:`.reporters`: :class:`FlowMoveReporter`, flow moves inside ``simulation.step``;
- :mod:`.replica_exchange`: :func:`run_replica_exchange`, the one openmmtools replica-exchange
  driver (storage, resume, settings check, seeding) under reference MD and the flow-bridged run;
- :mod:`.reference_md`: replica-exchange reference frames (openmmtools).

Import from the submodules (or the package root: ``cmt_openmm.reweight``, ``cmt_openmm.FlowIndependenceMove``);
this package imports nothing itself, as openmmtools is slow to import and prints a banner.
"""
