//! The attribute's options: `methods(a, b)`, `engine = EXPR` and `crate = PATH`.

use proc_macro2::TokenStream;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::{Expr, Ident, Token};

use super::Errors;

/// What the attribute's arguments say.
#[derive(Default)]
pub(crate) struct Options {
    /// `methods(..)`: the keyword and the method names.
    pub(crate) methods: Option<(Ident, Vec<Ident>)>,
    /// `engine = EXPR`: the keyword and the expression.
    pub(crate) engine: Option<(Ident, Expr)>,
    /// `crate = PATH`: where the runtime crate is, when not at `::checkpoint_runtime`.
    pub(crate) krate: Option<(Ident, syn::Path)>,
}

impl Options {
    /// The path of the runtime's macro support module in generated code.
    pub(crate) fn runtime(&self) -> TokenStream {
        match &self.krate {
            Some((_, path)) => quote::quote!(#path::__private),
            None => quote::quote!(::checkpoint_runtime::__private),
        }
    }

    /// The `methods` and `engine` keywords that were given, for "not allowed here" errors
    /// (`crate` is allowed everywhere).
    pub(crate) fn keywords(&self) -> Vec<&Ident> {
        let methods = self.methods.as_ref().map(|(kw, _)| kw);
        let engine = self.engine.as_ref().map(|(kw, _)| kw);
        methods.into_iter().chain(engine).collect()
    }
}

const EXPECTED: &str = "expected `methods(name, ..)`, `engine = EXPR` or `crate = PATH`";

/// Parses the options, collecting every error (unknown and duplicate options, malformed values)
/// and keeping what parsed.
pub(crate) fn options(args: TokenStream, errors: &mut Errors) -> Options {
    let mut options = Options::default();
    let parser = |input: ParseStream<'_>| -> syn::Result<()> {
        while !input.is_empty() {
            let key = input.call(Ident::parse_any)?;
            match key.to_string().as_str() {
                "methods" => {
                    if !input.peek(syn::token::Paren) {
                        return Err(syn::Error::new_spanned(
                            &key,
                            "expected `methods(name, ..)`, e.g. `methods(forward)` or \
                             `methods(forward, forward_cross)`",
                        ));
                    }
                    let content;
                    syn::parenthesized!(content in input);
                    let names = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
                    if names.is_empty() {
                        errors.push(syn::Error::new_spanned(
                            &key,
                            "`methods()` names no method: list the checkpointable methods, \
                             e.g. `methods(forward, forward_cross)`",
                        ));
                    }
                    if let Some((first, _)) = &options.methods {
                        errors.push(duplicate(&key, first));
                    } else {
                        options.methods = Some((key, names.into_iter().collect()));
                    }
                }
                "engine" => {
                    if !input.peek(Token![=]) {
                        return Err(syn::Error::new_spanned(
                            &key,
                            "expected `engine = EXPR`, e.g. `engine = ckpt` or `engine = self.ckpt`",
                        ));
                    }
                    input.parse::<Token![=]>()?;
                    let expr: Expr = input.parse()?;
                    if let Some((first, _)) = &options.engine {
                        errors.push(duplicate(&key, first));
                    } else {
                        options.engine = Some((key, expr));
                    }
                }
                "crate" => {
                    if !input.peek(Token![=]) {
                        return Err(syn::Error::new_spanned(
                            &key,
                            "expected `crate = PATH`, the path of the runtime crate where it is \
                             not `::checkpoint_runtime`, e.g. `crate = ::my_facade::checkpoint`",
                        ));
                    }
                    input.parse::<Token![=]>()?;
                    let path = input.call(syn::Path::parse_mod_style)?;
                    if let Some((first, _)) = &options.krate {
                        errors.push(duplicate(&key, first));
                    } else {
                        options.krate = Some((key, path));
                    }
                }
                _ => {
                    errors.push(syn::Error::new_spanned(
                        &key,
                        format!("unknown option `{key}`: {EXPECTED}"),
                    ));
                    // Skip this option's value, up to the next comma.
                    while !input.is_empty() && !input.peek(Token![,]) {
                        input.parse::<proc_macro2::TokenTree>()?;
                    }
                }
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(())
    };
    if let Err(err) = parser.parse2(args) {
        errors.push(err);
    }
    options
}

fn duplicate(key: &Ident, _first: &Ident) -> syn::Error {
    let fix = if key == "methods" {
        "list every checkpointable method in one `methods(..)`"
    } else if key == "crate" {
        "give the runtime's path once"
    } else {
        "a function or impl runs its `#[checkpoint]` statements through one engine"
    };
    syn::Error::new_spanned(key, format!("duplicate option `{key}`: {fix}"))
}
