"""Float64 ground truth written straight from the survey's equations (no tiling, no tricks)."""
from .linear import parallel_form as linear_parallel
from .linear import recurrent_form as linear_recurrent
from .softmax import mask_from_fn, softmax_attention, visibility

__all__ = ["softmax_attention", "visibility", "mask_from_fn", "linear_recurrent", "linear_parallel"]
