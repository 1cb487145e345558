"""The generator inside OpenMM: its energy −kT log q as an OpenMM force (openmm-torch export).

Empty until the export issue lands; the package exists so the layout shows where it goes.
"""
