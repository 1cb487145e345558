"""The torch backend: :class:`~.energy.TorchEnergy`, OpenMM Systems compiled to batched PyTorch.

- :mod:`.energy`: :class:`~.energy.TorchEnergy`, chunks of configurations evaluated in threads
  (CPU) or in order (GPU), optionally ``torch.compile``-d; :mod:`.chunks`: the chunk sizes,
  the thread pool and the terms summed on one chunk; :mod:`.memory`: the bytes a chunk
  may hold and the refusal when one configuration would not fit;
- :mod:`.forces`: maps each ``openmm.Force`` to its term; one module per force family
  (:mod:`.bonded`, :mod:`.nonbonded`, :mod:`.obc`, :mod:`.custom`, :mod:`.custom_gb`) on the
  shared :mod:`.term` base and :mod:`.geometry` of a chunk; :mod:`.lepton` compiles OpenMM's
  custom expressions as OpenMM evaluates them (parsed by :mod:`.lepton_parse`, simplified by
  :mod:`.lepton_optimize`, differentiated by :mod:`.lepton_derivative`, Lepton's rules each);
- :mod:`.verification`: the comparison with OpenMM's Reference platform at construction, on
  structures spread as training sees them; :mod:`.recheck`: a few of a run's own samples
  against OpenMM, switching the energy to OpenMM on a mismatch.
- :mod:`.compile_probe`: whether compiled chunks are safe on this machine, checked once in a
  subprocess (a crash in compiled code cannot be caught in-process) and cached.

Imports nothing itself. ``import torch`` in these modules is the real PyTorch (imports are
absolute).
"""
