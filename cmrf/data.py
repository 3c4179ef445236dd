"""``cmrf.data``: the datasets of ``cmrf train`` (synthetic, ISIC 2018, folders, NIfTI volumes).

The implementation lives in ``cmrf.train.data``; this module is its public name.
"""

from cmrf.train.data import *  # noqa: F403
from cmrf.train.data import __all__  # noqa: F401
