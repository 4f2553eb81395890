"""KV caches for decoding (survey Table 4, KV storage): contiguous, paged (block tables, copy-on-write),
quantized (KIVI, KVQuant-style pre-RoPE keys with sparse outliers, INT8), and the eviction policies StreamingLLM and H2O. `effattn.decode(q, cache)` reads
any of them with one split-KV kernel family."""
from .base import decode_reference
from .contiguous import ContiguousKVCache
from .eviction import H2O, StreamingLLM
from .paged import PagedKVCache, PoolExhaustedError
from .quantized import QuantizedKVCache, int8_cache, kivi_cache, kvquant_cache

__all__ = ["decode_reference", "ContiguousKVCache", "PagedKVCache", "PoolExhaustedError", "QuantizedKVCache", "kivi_cache",
           "kvquant_cache", "int8_cache", "StreamingLLM", "H2O"]
