"""Importing the package prints nothing: the notices libraries log on import (pymbar, which
openmmtools imports; torch's C++ extension finder on a machine without a GPU) are dropped at their
loggers, and the libraries' other records still pass."""
import logging
import subprocess
import sys

from helpers import ROOT


def test_importing_the_package_and_its_openmmtools_modules_prints_nothing():
    code = ("import cmt_openmm, cmt_openmm.sampling.moves, cmt_openmm.sampling.reference_md, "
            "torch.utils.cpp_extension")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0
    assert (proc.stdout, proc.stderr) == ("", "")


def test_only_the_banners_are_dropped(caplog):
    import cmt_openmm  # noqa: F401 - installs the filters

    logger = logging.getLogger("pymbar.mbar_solvers")
    with caplog.at_level(logging.WARNING):
        logger.warning("\n********* JAX NOT FOUND *********\n PyMBAR can run faster with JAX\n")
        logger.warning("WARNING: Did not converge to within specified tolerance.")
    assert [r.getMessage() for r in caplog.records] == ["WARNING: Did not converge to within specified tolerance."]
