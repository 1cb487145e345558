"""The ``cmt-openmm`` command line (:mod:`.main`; :mod:`.flow_bridged_remd` for ``bridge-remd``, :mod:`.options` for the
options the replica-exchange commands share)."""
from .main import main

__all__ = ["main"]
