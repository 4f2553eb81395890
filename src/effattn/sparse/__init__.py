"""Class 3 of the survey, sparse attention: fixed patterns, dynamic block selection, LSH, low rank."""
from . import patterns  # noqa: F401
from . import pattern_methods, dynamic, nsa, lsh, linformer, differential  # noqa: F401,E401  (registers)
from .patterns import Pattern, draw  # noqa: F401
from .pattern_methods import pattern_attention  # noqa: F401
from .dynamic import moba, quest, xattention  # noqa: F401
from .nsa import nsa  # noqa: F401,E402
from .lsh import lsh_attention  # noqa: F401,E402
from .linformer import linformer  # noqa: F401,E402
from .differential import differential_attention  # noqa: F401,E402
