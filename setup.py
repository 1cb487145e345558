"""Packaging for cmt-openmm. Tested versions are pinned in .ci/constraints.txt:
``pip install -c .ci/constraints.txt .[test]``."""
from setuptools import find_packages, setup

setup(
    name="cmt-openmm",
    version="0.1.0",
    description="Boltzmann generators trained with Constrained Mass Transport against OpenMM energies",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cmt_openmm", "cmt_openmm.*"]),
    package_data={"cmt_openmm.flows": ["spline_kernel.cpp"]},  # compiled on first use (flows/spline_kernel.py)
    install_requires=[
        "openmm>=8.5",
        "openmmtools>=0.25",
        "torch>=2.4",
        "numpy",
        "scipy",
        "mdtraj",
        "netCDF4",
        "pymbar",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "torch-force": ["openmmtorch==1.5", "torch==2.9.*"],  # to_openmm_force(..., backend="torch")
        "test": ["pytest", "pytest-timeout", "openmmtorch==1.5", "torch==2.9.*"],
    },
    entry_points={"console_scripts": ["cmt-openmm = cmt_openmm.cli:main"]},
)
