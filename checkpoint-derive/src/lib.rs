//! The `#[checkpointable]` attribute. Use it through `checkpoint-runtime`, which re-exports it
//! (generated code names `::checkpoint_runtime::__private`).

use proc_macro::TokenStream;

mod imp;

#[doc = include_str!("../doc/checkpointable.md")]
#[proc_macro_attribute]
pub fn checkpointable(args: TokenStream, item: TokenStream) -> TokenStream {
    imp::checkpointable(args.into(), item.into()).into()
}
