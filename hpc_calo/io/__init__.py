"""CaloChallenge HDF5 input and output."""

from hpc_calo.io.check import Summary, check_file
from hpc_calo.io.hdf5 import Block, CaloFile, CaloWriter, iter_blocks

__all__ = ["Block", "CaloFile", "CaloWriter", "Summary", "check_file", "iter_blocks"]
