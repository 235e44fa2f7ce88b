"""mpiattn: head-sharded Transformer attention over MPI, checksum-validated, written to HDF5.

    mpiexec -n 4 mpiattn run                    # embedded BERT-base default
    mpiexec -n 3 mpiattn run jobs/configs/minilm.toml
"""

__version__ = "0.1.0"
