//! Qwen2-MoE (Hugging Face `Qwen2MoeForCausalLM`) written with `#[checkpointable]`.
