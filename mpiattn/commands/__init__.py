"""The command line and what each subcommand runs: ``cli`` (parsing, pre-flight, exit
codes), ``runner`` (run), ``encode`` (text runs), ``bench`` and ``seqbench``, ``train``,
``info``; the job kit they share: ``jobkit`` (pre-flight agreement, input digests, agreed
publishing), ``placement`` (grid, backend, heads, reducers, shards), ``warmup``,
``progress``.
"""
