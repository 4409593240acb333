"""vitpipe's engine: configs, the stage DAG, run state, storage and the command line.

The core of this package knows stages only by name (see :mod:`pipeline.registry`); it imports
neither :mod:`stages` nor :mod:`cluster`. The command line (:mod:`pipeline.cli`) is the one place
that wires the three together.
"""

__version__ = "0.1.0"
