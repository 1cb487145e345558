"""Benchmarks of cmt_openmm: each module is a script that prints a table and writes JSON.

Run one from the repository root as a module, e.g. ``python -m benchmarks.aldp_methods --tiny``
(``.ci/with-env python -m benchmarks.aldp_methods --tiny`` in the pinned environment); the
repository root on the path is all they need (``.ci/with-env`` puts it there, so
``python benchmarks/aldp_methods.py`` works there as well). Measured results: ``RESULTS.md``.
"""
