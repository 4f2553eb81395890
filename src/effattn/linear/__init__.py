"""Class 4 of the survey, linear attention: the gated recurrence S_t = G_t * S_{t-1} + beta_t k_t^T v_t."""
from .engine import chunk_gated_linear_attn
from .feature_maps import elu_plus_one
from .fused_recurrent import fused_recurrent_gated_linear_attn
from .gated import delta_net, gated_delta_net, gated_linear_attn, gla, lightning, retnet, retnet_gamma, simple_gla
from .linear_transformer import linear_transformer
from .mamba import mamba
from .mamba2 import mamba2
from .mlstm import mlstm
from .performer import FavorProjection, orthogonal_random_features, performer
from .rwkv4 import rwkv4
from .rwkv6 import rwkv5, rwkv6
from .rwkv7 import fused_recurrent_rwkv7, rwkv7
from .gsa import gsa
from .metala import metala
from .cosformer import cosformer
from .rfa import gaussian_random_features, rfa
from .ttt import ttt_linear, ttt_mlp
from .slstm import slstm

__all__ = ["elu_plus_one", "linear_transformer", "chunk_gated_linear_attn", "fused_recurrent_gated_linear_attn",
           "gated_linear_attn", "lightning", "retnet", "retnet_gamma", "simple_gla", "gla", "delta_net",
           "gated_delta_net", "performer", "orthogonal_random_features", "FavorProjection", "mamba2", "rwkv4", "rwkv5",
           "rwkv6", "rwkv7", "fused_recurrent_rwkv7", "gsa", "ttt_linear", "ttt_mlp", "rfa", "gaussian_random_features",
           "cosformer", "mamba", "mlstm", "slstm", "metala"]
