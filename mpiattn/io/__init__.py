"""Files: one module per file kind (``formats``: run, text run, bench, train, training
checkpoint; each its writer, its reader for ``mpiattn.open`` and verify's check), HDF5
writing mechanics (``h5io``) and ``verify``, safe reading of files someone handed you
(``h5safe``, ``safefile``), exclusive temporaries and atomic publishing (``outfile``),
weights of every source (``weights``, ``families``, ``tensorfile``, ``stmodules``),
Hugging Face names and export (``hf``, ``export``), a text run's parts (``corpusfile``).
"""
