//! The implementation of `#[checkpointable]`, on `proc_macro2` only, so that the expansion
//! snapshot test can include these modules (`#[path]`) and call [`checkpointable`] directly.
//!
//! parse (options, item kind) → validate (signatures, into a model) → expand (records, the
//! `Layer` impl, the invocation forms), and rewrite (`#[checkpoint]` call sites).

mod expand;
mod parse;
mod rewrite;
mod validate;

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};
use syn::Item;

use parse::Options;

/// Errors collected across an item, combined into one `compile_error!` stream.
#[derive(Default)]
pub(crate) struct Errors(Option<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn into_compile_errors(self) -> TokenStream {
        self.0.map(|e| e.to_compile_error()).unwrap_or_default()
    }
}

/// The attribute: `args` are the tokens inside `#[checkpointable(...)]`, `item` the annotated
/// item. Always returns the user's item (with `#[checkpoint]` markers consumed), followed by the
/// generated code, or by `compile_error!`s when something is wrong.
pub(crate) fn checkpointable(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let options = parse::options(args, &mut errors);
    let item = match syn::parse2::<Item>(item.clone()) {
        Ok(item) => item,
        Err(err) => {
            // Not an item syn knows: hand it back untouched, with the reason.
            let err = err.to_compile_error();
            return quote!(#item #err);
        }
    };
    let (item, generated) = expand_item(&options, item, &mut errors);
    let errors = errors.into_compile_errors();
    quote! {
        #item
        #generated
        #errors
    }
}

fn expand_item(options: &Options, item: Item, errors: &mut Errors) -> (Item, TokenStream) {
    let rt = options.runtime();
    match item {
        Item::Struct(item) => {
            validate::struct_options(options, errors);
            let generated = if errors.is_empty() {
                expand::layer_struct(&item, &rt)
            } else {
                TokenStream::new()
            };
            (Item::Struct(item), generated)
        }
        Item::Enum(item) => {
            validate::struct_options(options, errors);
            let generated = if errors.is_empty() {
                expand::layer_enum(&item, &rt)
            } else {
                TokenStream::new()
            };
            (Item::Enum(item), generated)
        }
        Item::Impl(mut item) => {
            let engine = options.engine.as_ref().map(|(_, e)| e);
            let markers = rewrite::impl_block(&mut item, engine, &rt, errors);
            let layer_mode = options.engine.is_none() || options.methods.is_some();
            if !layer_mode && markers == 0 {
                errors.push(syn::Error::new_spanned(
                    options.engine.as_ref().map(|(kw, _)| kw.clone()),
                    "no `#[checkpoint]` statement in this impl uses the engine: mark the layer \
                     calls to run through it with `#[checkpoint]`",
                ));
            }
            let mut generated = TokenStream::new();
            if layer_mode {
                let layer = validate::layer_impl(&item, options, errors);
                for method in &layer.methods {
                    generated.extend(expand::layer_method(&layer, method, &rt));
                }
            }
            (Item::Impl(item), generated)
        }
        Item::Fn(mut item) => {
            validate::fn_options(options, &item, errors);
            let engine = options.engine.as_ref().map(|(_, e)| e);
            let markers = rewrite::block(&mut item.block, engine, &rt, errors);
            if markers == 0 && engine.is_some() && errors.is_empty() {
                errors.push(syn::Error::new_spanned(
                    &item.sig.ident,
                    format!(
                        "no `#[checkpoint]` statement in `{}`: mark the layer calls (or the loop \
                         over the layers) that the engine should run",
                        item.sig.ident
                    ),
                ));
            }
            (Item::Fn(item), TokenStream::new())
        }
        other => {
            errors.push(validate::unsupported_item(&other));
            (other, TokenStream::new())
        }
    }
}

/// `tokens` as a string, for comparing expressions by their tokens.
pub(crate) fn token_string<T: ToTokens + ?Sized>(tokens: &T) -> String {
    tokens.to_token_stream().to_string()
}
