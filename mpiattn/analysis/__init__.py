"""Reading results offline, without MPI: the ``mpiattn.open`` API (``files``), ``report``,
``plan`` (the cost model and predictions) and the checksum ``detection`` study.
"""
