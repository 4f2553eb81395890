"""Class 4 of the survey, linear attention: the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t."""
from .feature_maps import elu_plus_one
from .linear_transformer import linear_transformer

__all__ = ["elu_plus_one", "linear_transformer"]
