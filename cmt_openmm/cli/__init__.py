"""The ``cmt-openmm`` command line (:mod:`.main`), its run files (:mod:`.run_files`) and presets (:mod:`.presets`)."""
from .main import main

__all__ = ["main"]
