//! Checks the annotated item against the rules of a checkpointable layer and turns it into the
//! model that `expand` reads. Every violation is an error spanned on the offending tokens, with
//! what to do about it; all of an item's violations are reported at once.

use proc_macro2::Span;
use syn::visit_mut::{self, VisitMut};
use syn::{
    FnArg, GenericArgument, GenericParam, Ident, ImplItem, ImplItemFn, Item, ItemFn, ItemImpl,
    Lifetime, Pat, PathArguments, ReturnType, Signature, Type, TypePath, Visibility,
};

use super::Errors;
use super::parse::Options;

/// A `#[checkpointable]` impl, validated.
pub(crate) struct LayerImpl<'a> {
    pub(crate) item: &'a ItemImpl,
    /// The layer type's name (`DecoderLayer` for `impl<T> DecoderLayer<T>`).
    pub(crate) name: Ident,
    pub(crate) methods: Vec<Method<'a>>,
}

/// One checkpointable method, validated.
pub(crate) struct Method<'a> {
    pub(crate) vis: &'a Visibility,
    pub(crate) sig: &'a Signature,
    pub(crate) carry_name: Ident,
    pub(crate) carry_ty: &'a Type,
    pub(crate) kwargs: Vec<Kwarg<'a>>,
    pub(crate) output: &'a Type,
    /// For a layer with several carries or outputs (a tuple carry argument, or a return type
    /// written `Result<(Tensor, ..)>`): how many tensors the carry is. `None`: the plain
    /// `&Tensor` → `Result<Tensor>` layer.
    pub(crate) carries: Option<usize>,
}

/// A keyword argument: everything after the carry.
pub(crate) struct Kwarg<'a> {
    pub(crate) name: Ident,
    pub(crate) ty: &'a Type,
    pub(crate) kind: Kind<'a>,
}

/// How a keyword argument is kept until backward.
pub(crate) enum Kind<'a> {
    /// `&T`, kept as `T` (`&str` as `String`, `&[T]` as `Vec<T>`).
    Ref(&'a Type),
    /// `Option<&T>`, kept as `Option<T>`.
    OptRef(&'a Type),
    /// Any owned type, kept as itself (cloned for each call).
    Value,
}

pub(crate) fn struct_options(options: &Options, errors: &mut Errors) {
    for kw in options.keywords() {
        let hint = if kw == "methods" {
            "`methods(..)` goes on the layer's impl, next to the methods it names"
        } else {
            "`engine = ..` goes on the model function (or impl) whose `#[checkpoint]` \
             statements should run through the engine"
        };
        errors.push(syn::Error::new_spanned(
            kw,
            format!("`#[checkpointable]` on a struct takes no options: {hint}"),
        ));
    }
}

pub(crate) fn fn_options(options: &Options, item: &ItemFn, errors: &mut Errors) {
    if let Some((kw, _)) = &options.methods {
        errors.push(syn::Error::new_spanned(
            kw,
            "`methods(..)` goes on a layer's impl; on a function, `#[checkpointable]` takes \
             `engine = EXPR`",
        ));
    }
    if options.engine.is_none() {
        errors.push(syn::Error::new_spanned(
            &item.sig.ident,
            format!(
                "`#[checkpointable]` on a function needs the engine its `#[checkpoint]` \
                 statements run through: `#[checkpointable(engine = ckpt)]`, where `ckpt` is a \
                 `Checkpointer`, a reference to one or an `Option` of either; to make `{}` a \
                 checkpointable layer method, annotate its impl instead",
                item.sig.ident
            ),
        ));
    }
}

pub(crate) fn unsupported_item(item: &Item) -> syn::Error {
    let (tokens, what, hint): (&dyn quote::ToTokens, &str, &str) = match item {
        Item::Trait(t) => (
            &t.trait_token,
            "a trait",
            "the engine resolves concrete layers at compile time; annotate each layer's struct \
             and inherent impl",
        ),
        Item::Union(u) => (
            &u.union_token,
            "a union",
            "a layer is a struct whose fields (weights) the engine clones and keeps until \
             backward",
        ),
        other => (
            other,
            "this item",
            "annotate a layer's struct and its impl, or a model function",
        ),
    };
    syn::Error::new_spanned(
        tokens,
        format!(
            "`#[checkpointable]` applies to a layer struct (or enum), its impl, or a model function, not to \
             {what}: {hint}"
        ),
    )
}

/// The validated impl; the errors of invalid methods are pushed and the methods left out.
pub(crate) fn layer_impl<'a>(
    item: &'a ItemImpl,
    options: &Options,
    errors: &mut Errors,
) -> LayerImpl<'a> {
    let mut layer = LayerImpl {
        item,
        name: Ident::new("Layer", Span::call_site()),
        methods: Vec::new(),
    };
    if let Some((_, path, _)) = &item.trait_ {
        errors.push(syn::Error::new_spanned(
            path,
            "`#[checkpointable]` makes the methods of a layer's inherent impl (`impl DecoderLayer \
             { .. }`) checkpointable, not those of a trait impl; to rewrite `#[checkpoint]` calls \
             inside this impl, write `#[checkpointable(engine = ..)]`",
        ));
        return layer;
    }
    match &*item.self_ty {
        Type::Path(TypePath { qself: None, path }) if !path.segments.is_empty() => {
            if let Some(last) = path.segments.last() {
                layer.name = last.ident.clone();
            }
        }
        other => {
            errors.push(syn::Error::new_spanned(
                other,
                "`#[checkpointable]` expects the impl of a layer struct, e.g. `impl DecoderLayer`",
            ));
            return layer;
        }
    }
    let generic_names: Vec<Ident> = item
        .generics
        .params
        .iter()
        .filter_map(|p| match p {
            GenericParam::Type(t) => Some(t.ident.clone()),
            GenericParam::Const(c) => Some(c.ident.clone()),
            GenericParam::Lifetime(_) => None,
        })
        .collect();

    let names: Vec<Ident> = match &options.methods {
        Some((_, names)) => names.clone(),
        None => vec![Ident::new("forward", Span::call_site())],
    };
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            errors.push(syn::Error::new_spanned(
                name,
                format!("`{name}` is listed twice in `methods(..)`"),
            ));
            continue;
        }
        let found = item.items.iter().find_map(|it| match it {
            ImplItem::Fn(f) if f.sig.ident == *name => Some(f),
            _ => None,
        });
        let Some(method) = found else {
            let err = if options.methods.is_some() {
                syn::Error::new_spanned(name, format!("no method `{name}` in this impl"))
            } else {
                syn::Error::new_spanned(
                    &item.self_ty,
                    "this impl has no method `forward`, the method `#[checkpointable]` makes \
                     checkpointable by default: name the layer's methods with \
                     `#[checkpointable(methods(encode, ..))]`",
                )
            };
            errors.push(err);
            continue;
        };
        let mut method_errors = Errors::default();
        let validated = validate_method(method, &layer.name, &generic_names, &mut method_errors);
        match (validated, method_errors.0) {
            (Some(m), None) => layer.methods.push(m),
            (_, Some(err)) => errors.push(err),
            (None, None) => {}
        }
    }
    layer
}

fn validate_method<'a>(
    method: &'a ImplItemFn,
    layer: &Ident,
    generic_names: &[Ident],
    errors: &mut Errors,
) -> Option<Method<'a>> {
    let sig = &method.sig;
    let name = &sig.ident;
    if let Some(token) = &sig.asyncness {
        errors.push(syn::Error::new_spanned(
            token,
            format!(
                "`{name}` is `async`: the engine calls the forward synchronously, and calls it \
                 again during backward to recompute it; remove `async` (a layer's forward only \
                 queues tensor ops)"
            ),
        ));
    }
    if let Some(token) = &sig.unsafety {
        errors.push(syn::Error::new_spanned(
            token,
            format!(
                "`{name}` is `unsafe`: the engine re-runs it during backward, where no caller \
                 can uphold its safety contract; make it a safe method"
            ),
        ));
    }
    for param in &sig.generics.params {
        if !matches!(param, GenericParam::Lifetime(_)) {
            errors.push(syn::Error::new_spanned(
                param,
                format!(
                    "`{name}` is generic: the engine keeps its keyword arguments in a concrete \
                     record (`{layer}Kwargs..`) until backward, so a checkpointable method can \
                     have lifetime parameters only; make the type a parameter of the layer struct"
                ),
            ));
        }
    }

    let mut inputs = sig.inputs.iter().peekable();
    match inputs.peek() {
        Some(FnArg::Receiver(receiver)) => {
            check_receiver(receiver, name, errors);
            inputs.next();
        }
        _ => errors.push(syn::Error::new_spanned(
            name,
            format!(
                "`{name}` has no `self`: a checkpointable method is called on the layer, which \
                 the engine keeps (a clone sharing the weights) to re-run it during backward; \
                 add `&self` as its first parameter"
            ),
        )),
    }

    let carry = inputs.next();
    let (carry_name, carry_ty) = match carry {
        Some(FnArg::Typed(pat)) => {
            let ok = match &*pat.ty {
                Type::Tuple(t) => t.elems.len() >= 2 && t.elems.iter().all(is_tensor_ref),
                ty => is_tensor_ref(ty),
            };
            if !ok {
                errors.push(syn::Error::new_spanned(
                    &pat.ty,
                    format!(
                        "the carry of `{name}` (its first parameter after `&self`) must be \
                         `&Tensor`, or a tuple of them such as `(&Tensor, &Tensor)` for a \
                         carry of several tensors: it is what flows from layer to layer and \
                         receives the gradient, and the engine hands each layer borrowed \
                         tensors; pass other inputs after it, as keyword arguments"
                    ),
                ));
            }
            let carry_name = match &*pat.pat {
                Pat::Ident(p) => p.ident.clone(),
                _ => Ident::new("carry", Span::mixed_site()),
            };
            (carry_name, &*pat.ty)
        }
        _ => {
            errors.push(syn::Error::new_spanned(
                name,
                format!(
                    "`{name}` has no carry: after `&self`, a checkpointable method takes the \
                     tensor that flows from layer to layer and receives the gradient, e.g. \
                     `fn {name}(&self, xs: &Tensor, ..)`"
                ),
            ));
            return None;
        }
    };

    let mut kwargs = Vec::new();
    for input in inputs {
        let FnArg::Typed(pat) = input else { continue };
        let arg_name = match &*pat.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
            other => {
                errors.push(syn::Error::new_spanned(
                    other,
                    format!(
                        "name this keyword argument with a plain identifier: it becomes a field \
                         of `{layer}Kwargs`"
                    ),
                ));
                continue;
            }
        };
        let kind = match classify(&pat.ty, &arg_name, generic_names) {
            Ok(kind) => kind,
            Err(err) => {
                errors.push(err);
                continue;
            }
        };
        kwargs.push(Kwarg {
            name: arg_name,
            ty: &pat.ty,
            kind,
        });
    }

    let output = match &sig.output {
        ReturnType::Type(_, ty) => &**ty,
        ReturnType::Default => {
            errors.push(syn::Error::new_spanned(
                name,
                format!(
                    "`{name}` returns nothing: a checkpointable method returns the layer's \
                     output, `Result<Tensor>`"
                ),
            ));
            return None;
        }
    };
    let carry_arity = match carry_ty {
        Type::Tuple(t) => Some(t.elems.len()),
        _ => None,
    };
    let outputs = tuple_output(output);
    let carries = match (carry_arity, outputs) {
        (None, None) => None,
        (Some(n), Some(m)) if m >= n => Some(n),
        (None, Some(_)) => Some(1),
        (Some(n), m) => {
            errors.push(syn::Error::new_spanned(
                output,
                format!(
                    "`{name}` takes a carry of {n} tensors, so it returns the new carry first, \
                     as a tuple written out in the return type: `Result<({})>`, followed by any \
                     auxiliary outputs (it returns {})",
                    vec!["Tensor"; n].join(", "),
                    m.map_or_else(|| "one value".to_owned(), |m| format!("{m}"))
                ),
            ));
            return None;
        }
    };
    Some(Method {
        carries,
        vis: &method.vis,
        sig,
        carry_name,
        carry_ty,
        kwargs,
        output,
    })
}

fn check_receiver(receiver: &syn::Receiver, name: &Ident, errors: &mut Errors) {
    let mutates = format!(
        "`{name}` takes `&mut self`, but a checkpointed forward must not mutate the layer: \
         recomputation re-runs it during backward, so the mutation would happen twice and the \
         recomputed activations would differ from the forward's. Take `&self`; state that the \
         forward updates, such as a KV cache, belongs outside the checkpointed path (an \
         inference-only method, or an argument of a call that is not checkpointed)"
    );
    if receiver.colon_token.is_none() {
        if receiver.mutability.is_some() && receiver.reference.is_some() {
            errors.push(syn::Error::new_spanned(receiver, mutates));
        } else if receiver.reference.is_none() {
            errors.push(syn::Error::new_spanned(
                receiver,
                format!(
                    "`{name}` takes `self` by value, but the engine keeps the layer and calls \
                     it again during backward, by reference; take `&self`"
                ),
            ));
        }
        return;
    }
    match &*receiver.ty {
        Type::Reference(r) if is_self(&r.elem) => {
            if r.mutability.is_some() {
                errors.push(syn::Error::new_spanned(receiver, mutates));
            }
        }
        other => errors.push(syn::Error::new_spanned(
            other,
            format!(
                "unsupported receiver for `{name}`: the engine keeps a clone of the layer and \
                 calls it by reference; take `&self`"
            ),
        )),
    }
}

/// The number of elements of a return type written `Result<(A, B, ..)>` (or `Result<(..), E>`),
/// if it is one with two or more.
fn tuple_output(ty: &Type) -> Option<usize> {
    let Type::Path(p) = ty else { return None };
    let PathArguments::AngleBracketed(args) = &p.path.segments.last()?.arguments else {
        return None;
    };
    match args.args.first() {
        Some(GenericArgument::Type(Type::Tuple(t))) if t.elems.len() >= 2 => Some(t.elems.len()),
        _ => None,
    }
}

fn is_self(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("Self"))
}

fn is_tensor_ref(ty: &Type) -> bool {
    let Type::Reference(r) = ty else { return false };
    if r.mutability.is_some() {
        return false;
    }
    let Type::Path(p) = &*r.elem else {
        return false;
    };
    p.path
        .segments
        .last()
        .is_some_and(|s| s.ident == "Tensor" && s.arguments.is_none())
}

/// `Option<&T>` → `&T`'s reference.
fn option_of_ref(ty: &Type) -> Option<&syn::TypeReference> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Option" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.iter().collect::<Vec<_>>().as_slice() {
        [GenericArgument::Type(Type::Reference(r))] => Some(r),
        _ => None,
    }
}

fn classify<'a>(ty: &'a Type, name: &Ident, generic_names: &[Ident]) -> syn::Result<Kind<'a>> {
    // A `'static` borrow outlives backward: it is kept as it is, like an owned value.
    let is_static =
        |r: &syn::TypeReference| r.lifetime.as_ref().is_some_and(|l| l.ident == "static");
    let (kind, inner, outer_ref) = if let Type::Reference(r) = ty {
        let kind = if is_static(r) {
            Kind::Value
        } else {
            Kind::Ref(&r.elem)
        };
        (kind, &*r.elem, Some(r))
    } else if let Some(r) = option_of_ref(ty) {
        let kind = if is_static(r) {
            Kind::Value
        } else {
            Kind::OptRef(&r.elem)
        };
        (kind, &*r.elem, Some(r))
    } else {
        (Kind::Value, ty, None)
    };
    if let Some(r) = outer_ref {
        if r.mutability.is_some() {
            return Err(syn::Error::new_spanned(
                ty,
                format!(
                    "keyword argument `{name}` is a `&mut` borrow, which cannot be kept until \
                     backward: the engine keeps every keyword argument to call the forward \
                     again during backward, after this borrow has ended, and a forward that \
                     mutates its arguments would not recompute the same values. Pass it as \
                     `&T` or by value; state such as a KV cache belongs outside the \
                     checkpointed path"
                ),
            ));
        }
        if let Type::TraitObject(_) = inner {
            return Err(syn::Error::new_spanned(
                ty,
                format!(
                    "keyword argument `{name}` borrows a trait object, which cannot be kept \
                     until backward: the engine must own a copy of every keyword argument, and a \
                     `dyn` value cannot be cloned out of its borrow. Pass an owned, cloneable \
                     handle such as `Arc<dyn Fn(..) + Send + Sync>`, or a concrete type"
                ),
            ));
        }
    }
    let mut check = Check {
        name,
        generic_names,
        error: None,
        whole: ty,
    };
    let mut inner = inner.clone();
    check.visit_type_mut(&mut inner);
    match check.error {
        Some(err) => Err(err),
        None => Ok(kind),
    }
}

/// Finds what cannot be kept inside a keyword argument's type (after its outer reference).
struct Check<'a> {
    name: &'a Ident,
    generic_names: &'a [Ident],
    whole: &'a Type,
    error: Option<syn::Error>,
}

impl Check<'_> {
    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(syn::Error::new_spanned(self.whole, msg));
        }
    }
}

impl VisitMut for Check<'_> {
    fn visit_type_impl_trait_mut(&mut self, _: &mut syn::TypeImplTrait) {
        let name = self.name;
        self.fail(format!(
            "keyword argument `{name}` is an `impl Trait`, which cannot be kept until backward: \
             the engine stores every keyword argument in the generated owned record, and an \
             `impl Trait` argument has no type that record can name. Use a concrete type, or \
             an owned handle such as `Arc<dyn Trait + Send + Sync>`"
        ));
    }

    fn visit_type_ptr_mut(&mut self, _: &mut syn::TypePtr) {
        let name = self.name;
        self.fail(format!(
            "keyword argument `{name}` holds a raw pointer, which cannot be kept until backward: \
             nothing guarantees it is still valid when the backward pass recomputes the layer, \
             and it cannot be sent to the engine's threads. Pass an owned value or a `&T`"
        ));
    }

    fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
        if r.lifetime.as_ref().is_some_and(|l| l.ident == "static") {
            return;
        }
        let name = self.name;
        self.fail(format!(
            "keyword argument `{name}` holds a nested borrow, which cannot be kept until \
             backward: only an outer `&T` (or `Option<&T>`) is turned into an owned value for \
             the engine to keep. Pass owned values inside, e.g. `&[Tensor]` or `Vec<Tensor>` \
             rather than `&[&Tensor]`"
        ));
    }

    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if l.ident == "static" {
            return;
        }
        let name = self.name;
        self.fail(format!(
            "keyword argument `{name}` borrows (`{l}`), which cannot be kept until backward: \
             the engine keeps every keyword argument after the forward call returns. Pass the \
             owned form of the type"
        ));
    }

    fn visit_type_infer_mut(&mut self, _: &mut syn::TypeInfer) {
        let name = self.name;
        self.fail(format!("keyword argument `{name}` needs a complete type"));
    }

    // Trait objects behind an owned handle (`Arc<dyn Fn(&Tensor) -> ..>`) and function pointers
    // are fine: their inner borrows are higher-ranked.
    fn visit_type_trait_object_mut(&mut self, _: &mut syn::TypeTraitObject) {}
    fn visit_type_bare_fn_mut(&mut self, _: &mut syn::TypeBareFn) {}

    fn visit_type_path_mut(&mut self, p: &mut TypePath) {
        if p.qself.is_none()
            && let Some(first) = p.path.segments.first()
        {
            let name = self.name;
            if first.ident == "Self" {
                self.fail(format!(
                    "keyword argument `{name}` mentions `Self`: its type becomes a field of a \
                         keyword record declared outside the impl; name the type instead"
                ));
            } else if p.path.segments.len() == 1 && self.generic_names.contains(&first.ident) {
                let param = &first.ident;
                self.fail(format!(
                    "keyword argument `{name}` mentions the impl's generic parameter \
                         `{param}`: keyword records are not generic, so keyword arguments must \
                         have concrete types; keep `{param}`-typed state in the layer struct"
                ));
            }
        }
        visit_mut::visit_type_path_mut(self, p);
    }
}
