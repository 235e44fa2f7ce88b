"""Running the math over MPI: the process grid with named axes (``grid``), the checked
collectives and transfers (``comm``, ``transfers``: transport, check, retry policy,
ledger), injected faults (``faults``) and the watchdog bounding every wait (``watchdog``).
"""
