"""hpc-calo: Inductive CaloFlow on HPC and cloud clusters.

Importing the package has no side effects; every capability lives in its own module.
"""

__version__ = "0.1.0"
