//! Generates, for a layer struct, what lets call sites resolve it; and for each checkpointable
//! method: the keyword records, the `Layer<K>` impl (the one entry point), and the invocation
//! forms (`partial`, `call_kw`, and the hidden twins that `#[checkpoint]` call sites use).

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::visit_mut::{self, VisitMut};
use syn::{Ident, ItemStruct, Lifetime, Type};

use super::validate::{Kind, LayerImpl, Method};

/// The struct attribute: lets `#[checkpoint]` call sites resolve the layer (`__private::Resolve`).
///
/// `rt` is the path of the runtime's `__private` module in generated code.
pub(crate) fn layer_struct(item: &ItemStruct, rt: &TokenStream) -> TokenStream {
    layer_type(&item.ident, &item.generics, rt)
}

/// The enum attribute: like [`layer_struct`]. An enum of layers (`Dense(..)`, `Moe(..)`) is one
/// layer type whose method dispatches with `match`: a mixed stack.
pub(crate) fn layer_enum(item: &syn::ItemEnum, rt: &TokenStream) -> TokenStream {
    layer_type(&item.ident, &item.generics, rt)
}

fn layer_type(name: &Ident, generics: &syn::Generics, rt: &TokenStream) -> TokenStream {
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();
    quote! {
        #[automatically_derived]
        impl #impl_generics #rt::Resolve
            for #name #ty_generics #where_clause
        {
            type Layer = Self;
            #[inline]
            fn resolve(&self) -> &Self {
                self
            }
        }
    }
}

/// The names generated for one method.
struct Names {
    record: Ident,
    owned: Ident,
    partial: Ident,
    call_kw: Ident,
}

impl Names {
    fn new(layer: &Ident, method: &Ident) -> Self {
        let span = method.span();
        if method == "forward" {
            Self {
                record: format_ident!("{}Kwargs", layer, span = span),
                owned: format_ident!("{}KwargsOwned", layer, span = span),
                partial: Ident::new("partial", span),
                call_kw: Ident::new("call_kw", span),
            }
        } else {
            let pascal = pascal_case(&method.to_string());
            Self {
                record: format_ident!("{}{}Kwargs", layer, pascal, span = span),
                owned: format_ident!("{}{}KwargsOwned", layer, pascal, span = span),
                partial: format_ident!("partial_{}", method, span = span),
                call_kw: format_ident!("call_kw_{}", method, span = span),
            }
        }
    }
}

fn pascal_case(snake: &str) -> String {
    snake
        .trim_start_matches("r#")
        .split('_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_uppercase().chain(chars).collect::<String>()
            })
        })
        .collect()
}

/// The hidden twin of an invocation method, used by `#[checkpoint]` call sites: same arguments
/// minus the carry, returns the resolved layer and the owned keyword record. Its name is what
/// rustc shows when a call site invokes a method that is not checkpointable ("no method named
/// `__checkpointable_forward_t`"), so it says what is missing.
pub(crate) fn hidden_twin(method: &Ident) -> Ident {
    format_ident!("__checkpointable_{}", method, span = method.span())
}

/// `ty` (a carry type: `&Tensor` or a tuple of them) with every reference's lifetime `lifetime`.
fn with_lifetime(ty: &Type, lifetime: &Lifetime) -> Type {
    struct Set<'l>(&'l Lifetime);
    impl VisitMut for Set<'_> {
        fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
            r.lifetime = Some(self.0.clone());
            visit_mut::visit_type_reference_mut(self, r);
        }
    }
    let mut ty = ty.clone();
    Set(lifetime).visit_type_mut(&mut ty);
    ty
}

/// `ty` with `Self` replaced by `self_ty`, for use outside the layer's impl.
fn without_self(ty: &Type, self_ty: &Type) -> Type {
    struct Replace<'t>(&'t Type);
    impl VisitMut for Replace<'_> {
        fn visit_type_mut(&mut self, ty: &mut Type) {
            if matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("Self")) {
                *ty = self.0.clone();
            } else {
                visit_mut::visit_type_mut(self, ty);
            }
        }
    }
    let mut ty = ty.clone();
    Replace(self_ty).visit_type_mut(&mut ty);
    ty
}

fn is_str(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("str"))
}

/// The owned form of `T` in `&T`.
fn owned_of(inner: &Type, rt: &TokenStream) -> TokenStream {
    match inner {
        ty if is_str(ty) => quote!(#rt::String),
        Type::Slice(s) => {
            let elem = &s.elem;
            quote!(#rt::Vec<#elem>)
        }
        ty => quote!(#ty),
    }
}

pub(crate) fn layer_method(
    layer: &LayerImpl<'_>,
    method: &Method<'_>,
    rt: &TokenStream,
) -> TokenStream {
    let item = layer.item;
    let layer_name = &layer.name;
    let sig = method.sig;
    let method_name = &sig.ident;
    let vis = method.vis;
    let Names {
        record,
        owned,
        partial,
        call_kw,
    } = Names::new(layer_name, method_name);
    let twin = hidden_twin(method_name);
    let call_kw_twin = hidden_twin(&call_kw);
    let kwargs_var = Ident::new("kwargs", Span::mixed_site());
    let carry_var = Ident::new("carry", Span::mixed_site());

    let doc_method = format!("`{layer_name}::{method_name}`");
    let method_lit = method_name.to_string();
    let a = Lifetime::new("'a", Span::call_site());
    let borrows = method.kwargs.iter().any(|k| !matches!(k.kind, Kind::Value));
    let record_generics = if borrows { quote!(<#a>) } else { quote!() };
    let record_anon = if borrows { quote!(<'_>) } else { quote!() };

    let names: Vec<&Ident> = method.kwargs.iter().map(|k| &k.name).collect();
    let tys: Vec<&Type> = method.kwargs.iter().map(|k| k.ty).collect();
    let field_docs: Vec<String> = names
        .iter()
        .map(|n| format!(" The `{n}` argument of {doc_method}."))
        .collect();
    let borrowed_tys: Vec<TokenStream> = method
        .kwargs
        .iter()
        .map(|k| match k.kind {
            Kind::Ref(inner) => quote!(&#a #inner),
            Kind::OptRef(inner) => quote!(::core::option::Option<&#a #inner>),
            Kind::Value => {
                let ty = k.ty;
                quote!(#ty)
            }
        })
        .collect();
    let owned_tys: Vec<TokenStream> = method
        .kwargs
        .iter()
        .map(|k| match k.kind {
            Kind::Ref(inner) => owned_of(inner, rt),
            Kind::OptRef(inner) => {
                let inner = owned_of(inner, rt);
                quote!(::core::option::Option<#inner>)
            }
            Kind::Value => {
                let ty = k.ty;
                quote!(#ty)
            }
        })
        .collect();
    let keep: Vec<TokenStream> = method
        .kwargs
        .iter()
        .map(|k| {
            let n = &k.name;
            match k.kind {
                Kind::Ref(_) => quote!(#rt::keep_ref(self.#n)),
                Kind::OptRef(_) => quote!(#rt::keep_opt(self.#n)),
                Kind::Value => quote!(self.#n),
            }
        })
        .collect();
    let reborrow: Vec<TokenStream> = method
        .kwargs
        .iter()
        .map(|k| {
            let n = &k.name;
            match k.kind {
                Kind::Ref(_) => quote!(&#kwargs_var.#n),
                Kind::OptRef(inner) if is_str(inner) || matches!(inner, Type::Slice(_)) => {
                    quote!(::core::option::Option::as_deref(&#kwargs_var.#n))
                }
                Kind::OptRef(_) => quote!(::core::option::Option::as_ref(&#kwargs_var.#n)),
                Kind::Value => quote!(#rt::reuse(&#kwargs_var.#n)),
            }
        })
        .collect();

    let record_doc = format!(
        " The keyword arguments of {doc_method}, borrowed: pass them by name with \
         `{layer_name}::{call_kw}`."
    );
    let owned_doc = format!(
        " The keyword arguments of {doc_method}, owned: what an engine keeps until backward \
         recomputes the layer (the `K` of `Layer<K>`)."
    );
    let record_name = record.to_string();
    let owned_name = owned.to_string();

    let (impl_generics, _, where_clause) = item.generics.split_for_impl();
    let self_ty = &item.self_ty;
    let layer_where = if item.generics.params.is_empty() {
        quote!(#where_clause)
    } else {
        let bound = quote! {
            Self: ::core::clone::Clone + ::core::marker::Send + ::core::marker::Sync + 'static
        };
        match where_clause {
            Some(w) if !w.predicates.is_empty() => {
                // Each predicate with its own comma: the user's list may end in one already
                // (rustfmt's multi-line style).
                let preds = w.predicates.iter();
                quote!(where #(#preds,)* #bound)
            }
            _ => quote!(where #bound),
        }
    };

    let method_generics = &sig.generics;
    let method_where = &sig.generics.where_clause;
    let carry_name = &method.carry_name;
    let carry_ty = method.carry_ty;
    let output = method.output;
    let partial_doc = format!(
        " Binds the keyword arguments of {doc_method} and returns a `Partial`, like Python's \
         `functools.partial`: call it later with `.call(&xs)`, or inside `#[checkpoint]` \
         statements, where the engine re-runs {doc_method} with these same arguments."
    );
    let call_kw_doc = [
        format!(" Calls {doc_method} with its keyword arguments given by name (`{record_name}`)."),
        String::new(),
        " # Errors".to_owned(),
        format!(" The error of {doc_method}."),
    ];
    let span = method_name.span();
    let assert_struct = quote_spanned! {span=>
        #rt::assert_layer_struct::<Self>();
    };

    let layer_impl = match method.carries {
        None => quote! {
            #[automatically_derived]
            impl #impl_generics #rt::Layer<#owned> for #self_ty #layer_where {
                fn forward_checkpointed(
                    &self,
                    #carry_var: &#rt::Tensor,
                    #kwargs_var: &#owned,
                ) -> #rt::CandleResult<#rt::Tensor> {
                    #assert_struct
                    #rt::layer_output(Self::#method_name(self, #carry_var, #(#reborrow),*))
                }
            }
        },
        Some(n) => {
            let parts: Vec<Ident> = (0..n)
                .map(|i| format_ident!("__ckpt_carry{}", i, span = Span::mixed_site()))
                .collect();
            let arg = if matches!(method.carry_ty, Type::Tuple(_)) {
                quote!((#(#parts),*))
            } else {
                quote!(#(#parts)*)
            };
            quote! {
                #[automatically_derived]
                impl #impl_generics #rt::MultiLayer<#owned> for #self_ty #layer_where {
                    const CARRIES: usize = #n;
                    fn forward_outputs(
                        &self,
                        #carry_var: &[#rt::Tensor],
                        #kwargs_var: &#owned,
                    ) -> #rt::CandleResult<#rt::Vec<#rt::Tensor>> {
                        #assert_struct
                        let [#(#parts),*] = #carry_var else {
                            return ::core::result::Result::Err(
                                #rt::carry_arity(#n, #carry_var.len()),
                            );
                        };
                        #rt::layer_outputs(Self::#method_name(self, #arg, #(#reborrow),*))
                    }
                }
            }
        }
    };

    // `Partial::call` calls the method itself through `Method`, with its own carry argument and
    // return type. Inside this impl `Self` is the record, so the layer's `Self` is spelled out.
    let c = Lifetime::new("'__ckpt_c", Span::call_site());
    let method_carry = with_lifetime(carry_ty, &c);
    let method_output = without_self(output, self_ty);
    let layer_var = Ident::new("layer", Span::mixed_site());
    let method_impl = quote! {
        #[automatically_derived]
        impl #impl_generics #rt::Method<#self_ty> for #owned #where_clause {
            type Carry<#c> = #method_carry;
            type Output = #method_output;
            fn invoke(
                #layer_var: &#self_ty,
                #carry_var: Self::Carry<'_>,
                #kwargs_var: &Self,
            ) -> Self::Output {
                <#self_ty>::#method_name(#layer_var, #carry_var, #(#reborrow),*)
            }
        }
    };

    quote! {
        #[doc = #record_doc]
        #[allow(dead_code)]
        #vis struct #record #record_generics {
            #(
                #[doc = #field_docs]
                #vis #names: #borrowed_tys,
            )*
        }

        #[automatically_derived]
        impl ::core::fmt::Debug for #record #record_anon {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(#record_name).finish_non_exhaustive()
            }
        }

        #[allow(dead_code)]
        impl #record_generics #record #record_generics {
            /// Clones the arguments into the owned record that an engine keeps until backward
            /// (tensors are reference-counted: cloning one shares its storage).
            #[must_use]
            #vis fn into_owned(self) -> #owned {
                #owned {
                    #( #names: #keep, )*
                }
            }
        }

        #[doc = #owned_doc]
        #[derive(Clone)]
        #[allow(dead_code)]
        #vis struct #owned {
            #(
                #[doc = #field_docs]
                #vis #names: #owned_tys,
            )*
        }

        #[automatically_derived]
        impl ::core::fmt::Debug for #owned {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(#owned_name).finish_non_exhaustive()
            }
        }

        #[automatically_derived]
        impl #rt::Kwargs for #owned {
            const METHOD: &'static str = #method_lit;
        }

        #layer_impl

        #method_impl

        #[allow(dead_code)]
        impl #impl_generics #self_ty #where_clause {
            #[doc = #partial_doc]
            #[must_use]
            #vis fn #partial #method_generics (
                &self,
                #( #names: #tys ),*
            ) -> #rt::Partial<'_, Self, #owned> #method_where {
                #rt::Partial::new(self, #record { #(#names),* }.into_owned())
            }

            #(#[doc = #call_kw_doc])*
            #vis fn #call_kw #method_generics (
                &self,
                #carry_name: #carry_ty,
                #kwargs_var: #record #record_anon,
            ) -> #output #method_where {
                Self::#method_name(self, #carry_name, #(#kwargs_var.#names),*)
            }

            #[doc(hidden)]
            #vis fn #twin #method_generics (
                &self,
                #( #names: #tys ),*
            ) -> (&Self, #owned) #method_where {
                (self, #record { #(#names),* }.into_owned())
            }

            #[doc(hidden)]
            #vis fn #call_kw_twin(&self, #kwargs_var: #record #record_anon) -> (&Self, #owned) {
                (self, #kwargs_var.into_owned())
            }
        }
    }
}
