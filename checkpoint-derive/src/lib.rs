//! The `#[checkpointable]` attribute. Use it through `checkpoint-runtime`, which re-exports it.

use proc_macro::TokenStream;

/// Marks a layer (struct and impl) or a model forward for gradient checkpointing.
#[proc_macro_attribute]
pub fn checkpointable(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
