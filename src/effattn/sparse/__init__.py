"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank."""
from . import patterns  # noqa: F401
from . import pattern_methods, dynamic  # noqa: F401,E401  (register their methods)
from .patterns import Pattern, draw  # noqa: F401
from .pattern_methods import pattern_attention  # noqa: F401
from .dynamic import moba, quest, xattention  # noqa: F401
