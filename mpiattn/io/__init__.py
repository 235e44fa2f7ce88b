"""Files: HDF5 writing and verify (``h5io``), safe reading of files someone handed you
(``h5safe``), where each dataset goes (``layout``), exclusive temporaries and atomic
publishing (``outfile``), weights of every source (``weights``), training checkpoints
(``checkpoints``), Hugging Face names and export (``hf``, ``export``), a text run's parts
(``corpusfile``).
"""
