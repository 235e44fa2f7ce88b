"""The math: array code over ``xp`` (NumPy or CuPy) that never imports mpi4py or h5py.

Layer operations as forward / caching-forward / backward pairs (``ops``, ``model``,
``mlm``), the attention algorithms (``attention``, ``seqattn``), the head partition
(``shard``), the schedules (``pipeline``), pure ABFT (``checksum``), the optimizers
(``optim``), per-head statistics (``headstats``) and the one-process ``reference``.
Reductions and transfers are passed in as callables, so everything here runs in one
process against the reference (``tests/test_boundaries.py`` enforces the rule).
"""
