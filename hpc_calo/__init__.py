"""hpc-calo: Inductive CaloFlow on HPC and cloud clusters.

Importing the package has one side effect: OpenMP is told to wait passively (``hpc_calo.cpus``), which only
works before torch is loaded. Every capability lives in its own module.
"""

from hpc_calo.cpus import quiet_openmp

quiet_openmp()

__version__ = "0.1.0"
