//! Fused differentiable ops for candle: each a `CustomOp` with a CPU kernel and a backward.
