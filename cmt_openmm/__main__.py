"""``python -m cmt_openmm`` runs the ``cmt-openmm`` command line."""
import sys

from .cli import main

sys.exit(main())
