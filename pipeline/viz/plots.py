"""pyplot for every figure the pipeline draws, on the non-interactive Agg backend (stages run
headless and only write PNG files), chosen here once instead of in every stage."""
from __future__ import annotations

import functools


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
