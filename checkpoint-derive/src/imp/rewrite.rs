//! Call-site rewriting: statements marked `#[checkpoint]` inside a function (or the methods of
//! an impl) annotated with `#[checkpointable(engine = EXPR)]` run their layer invocations
//! through the engine. A loop becomes ONE `run_stack` over all its layers; a single invocation
//! is a stack of one. With no engine active (`None`), the original statement runs unchanged.

use proc_macro2::{Spacing, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::visit_mut::{self, VisitMut};
use syn::{
    Attribute, Block, Expr, ExprForLoop, ExprMethodCall, ExprPath, Ident, ImplItem, ItemImpl,
    Local, LocalInit, Pat, Stmt, Type,
};

use super::expand::hidden_twin;
use super::{Errors, token_string};

const SHAPES: &str = "`#[checkpoint]` supports these statements:\n\
    - `for PAT in ITER { CARRY = INVOCATION?; }` (optionally with `let` statements before the \
      assignment): the whole loop runs as one stack,\n\
    - `let PAT = ITER.try_fold(INIT, |ACC, ITEM| INVOCATION)?;`: likewise,\n\
    - `let PAT = INVOCATION?;`: a stack of one,\n\
    - `let (P0, P1, ..) = INVOCATION?;` for a layer returning a tuple: a stack of one, binding \
      the new carry, then the auxiliary outputs,\n\
    where INVOCATION is `layer.forward(&xs, ..)`, `Layer::forward(layer, &xs, ..)`, \
    `layer.call_kw(&xs, LayerKwargs { .. })` or `partial.call(&xs)`";

/// Rewrites the marked statements of every method of `item`; returns how many there were.
/// `rt` is the path of the runtime's `__private` module in generated code.
pub(crate) fn impl_block(
    item: &mut ItemImpl,
    engine: Option<&Expr>,
    rt: &TokenStream,
    errors: &mut Errors,
) -> usize {
    let mut count = 0;
    for it in &mut item.items {
        if let ImplItem::Fn(f) = it {
            count += block(&mut f.block, engine, rt, errors);
        }
    }
    count
}

/// Rewrites the marked statements of `body`; returns how many there were.
pub(crate) fn block(
    body: &mut Block,
    engine: Option<&Expr>,
    rt: &TokenStream,
    errors: &mut Errors,
) -> usize {
    let mut rewriter = Rewriter {
        engine,
        rt,
        errors,
        count: 0,
    };
    rewriter.visit_block_mut(body);
    rewriter.count
}

struct Rewriter<'a> {
    engine: Option<&'a Expr>,
    rt: &'a TokenStream,
    errors: &'a mut Errors,
    count: usize,
}

/// What every rewritten statement needs: the engine expression and the runtime's path.
#[derive(Clone, Copy)]
struct Site<'a> {
    engine: &'a Expr,
    rt: &'a TokenStream,
}

impl VisitMut for Rewriter<'_> {
    fn visit_block_mut(&mut self, block: &mut Block) {
        let stmts = std::mem::take(&mut block.stmts);
        for mut stmt in stmts {
            let Some(marker) = take_marker(&mut stmt) else {
                visit_mut::visit_stmt_mut(self, &mut stmt);
                block.stmts.push(stmt);
                continue;
            };
            self.count += 1;
            let Some(engine) = self.engine else {
                self.errors.push(syn::Error::new_spanned(
                    marker,
                    "`#[checkpoint]` needs an engine to run through: annotate the enclosing \
                     function (or impl) with `#[checkpointable(engine = ckpt)]`, where `ckpt` is \
                     a `Checkpointer`, a reference to one or an `Option` of either",
                ));
                block.stmts.push(stmt);
                continue;
            };
            match statement(
                &stmt,
                Site {
                    engine,
                    rt: self.rt,
                },
            ) {
                Ok(new) => block.stmts.push(new),
                Err(err) => {
                    self.errors.push(err);
                    // Keep the statement, and keep the engine used: one mistake, one error.
                    block.stmts.push(syn::parse_quote!(let _ = &(#engine);));
                    block.stmts.push(stmt);
                }
            }
        }
    }

    // Nested items are not part of this function. A nested `fn` with its own
    // `#[checkpointable]` is rewritten by that attribute; in one without, each marker gets the
    // error saying which attribute its function needs (rather than rustc's "cannot find
    // attribute `checkpoint`").
    fn visit_item_mut(&mut self, item: &mut syn::Item) {
        if let syn::Item::Fn(f) = item {
            let annotated = f.attrs.iter().any(|a| {
                a.path()
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "checkpointable")
            });
            if !annotated {
                block(&mut f.block, None, self.rt, self.errors);
            }
        }
    }
}

fn is_marker(attr: &Attribute) -> bool {
    attr.path().is_ident("checkpoint")
}

/// Removes `#[checkpoint]` from the statement's attributes, returning it.
fn take_marker(stmt: &mut Stmt) -> Option<Attribute> {
    let attrs = match stmt {
        Stmt::Local(local) => &mut local.attrs,
        Stmt::Item(_) => return None,
        Stmt::Macro(m) => &mut m.attrs,
        Stmt::Expr(expr, _) => expr_attrs(expr)?,
    };
    let pos = attrs.iter().position(is_marker)?;
    Some(attrs.remove(pos))
}

fn expr_attrs(expr: &mut Expr) -> Option<&mut Vec<Attribute>> {
    Some(match expr {
        Expr::Array(e) => &mut e.attrs,
        Expr::Assign(e) => &mut e.attrs,
        Expr::Async(e) => &mut e.attrs,
        Expr::Await(e) => &mut e.attrs,
        Expr::Binary(e) => &mut e.attrs,
        Expr::Block(e) => &mut e.attrs,
        Expr::Break(e) => &mut e.attrs,
        Expr::Call(e) => &mut e.attrs,
        Expr::Cast(e) => &mut e.attrs,
        Expr::Closure(e) => &mut e.attrs,
        Expr::Const(e) => &mut e.attrs,
        Expr::Continue(e) => &mut e.attrs,
        Expr::Field(e) => &mut e.attrs,
        Expr::ForLoop(e) => &mut e.attrs,
        Expr::Group(e) => &mut e.attrs,
        Expr::If(e) => &mut e.attrs,
        Expr::Index(e) => &mut e.attrs,
        Expr::Infer(e) => &mut e.attrs,
        Expr::Let(e) => &mut e.attrs,
        Expr::Lit(e) => &mut e.attrs,
        Expr::Loop(e) => &mut e.attrs,
        Expr::Macro(e) => &mut e.attrs,
        Expr::Match(e) => &mut e.attrs,
        Expr::MethodCall(e) => &mut e.attrs,
        Expr::Paren(e) => &mut e.attrs,
        Expr::Path(e) => &mut e.attrs,
        Expr::Range(e) => &mut e.attrs,
        Expr::RawAddr(e) => &mut e.attrs,
        Expr::Reference(e) => &mut e.attrs,
        Expr::Repeat(e) => &mut e.attrs,
        Expr::Return(e) => &mut e.attrs,
        Expr::Struct(e) => &mut e.attrs,
        Expr::Try(e) => &mut e.attrs,
        Expr::TryBlock(e) => &mut e.attrs,
        Expr::Tuple(e) => &mut e.attrs,
        Expr::Unary(e) => &mut e.attrs,
        Expr::Unsafe(e) => &mut e.attrs,
        Expr::While(e) => &mut e.attrs,
        Expr::Yield(e) => &mut e.attrs,
        _ => return None,
    })
}

fn unsupported(tokens: &dyn ToTokens, what: &str) -> syn::Error {
    syn::Error::new_spanned(tokens, format!("{what}\n{SHAPES}"))
}

/// `match engine(&(EXPR)) { None => PLAIN, Some(engine) => CHECKPOINTED }`.
fn with_engine(site: Site<'_>, plain: &TokenStream, checkpointed: &TokenStream) -> TokenStream {
    let Site { engine, rt } = site;
    let var = engine_var();
    let lookup = quote_spanned!(engine.span()=> #rt::engine(&(#engine)));
    quote! {
        match #lookup {
            ::core::option::Option::None => #plain,
            ::core::option::Option::Some(#var) => #checkpointed,
        }
    }
}

fn engine_var() -> Ident {
    Ident::new("__ckpt_engine", Span::mixed_site())
}

fn calls_var() -> Ident {
    Ident::new("__ckpt_calls", Span::mixed_site())
}

fn statement(stmt: &Stmt, site: Site<'_>) -> syn::Result<Stmt> {
    match stmt {
        Stmt::Expr(Expr::ForLoop(for_loop), _) => {
            let tokens = for_loop_stmt(for_loop, site)?;
            syn::parse2(tokens)
        }
        Stmt::Local(Local {
            init:
                Some(LocalInit {
                    diverge: Some((else_token, _)),
                    ..
                }),
            ..
        }) => Err(unsupported(
            else_token,
            "`let .. else` is not supported here.",
        )),
        Stmt::Local(
            local @ Local {
                init: Some(init), ..
            },
        ) => {
            if let Pat::Tuple(tuple) = strip_pat(&local.pat) {
                return multi_let(local, tuple, &init.expr, site);
            }
            let mut local = local.clone();
            let value = value(&init.expr, site)?;
            local.init = Some(LocalInit {
                eq_token: init.eq_token,
                expr: Box::new(syn::parse2(value)?),
                diverge: None,
            });
            Ok(Stmt::Local(local))
        }
        Stmt::Expr(Expr::Assign(assign), semi) => {
            let mut assign = assign.clone();
            assign.right = Box::new(syn::parse2(value(&assign.right, site)?)?);
            Ok(Stmt::Expr(Expr::Assign(assign), *semi))
        }
        Stmt::Expr(expr @ (Expr::Try(_) | Expr::MethodCall(_) | Expr::Call(_)), semi) => {
            Ok(Stmt::Expr(syn::parse2(value(expr, site)?)?, *semi))
        }
        other => Err(unsupported(
            other,
            "`#[checkpoint]` cannot rewrite this statement.",
        )),
    }
}

/// A marked value: `INVOCATION`, `FOLD`, or either followed by `?`.
fn value(expr: &Expr, site: Site<'_>) -> syn::Result<TokenStream> {
    if let Expr::Try(t) = expr {
        let inner = value_inner(&t.expr, site)?;
        let q = &t.question_token;
        return Ok(quote!((#inner) #q));
    }
    value_inner(expr, site)
}

fn value_inner(expr: &Expr, site: Site<'_>) -> syn::Result<TokenStream> {
    let rt = site.rt;
    let var = engine_var();
    if let Expr::MethodCall(call) = strip_parens(expr)
        && call.method == "try_fold"
    {
        return fold(call, site);
    }
    let inv = invocation(expr, rt)?;
    let pair = &inv.pair;
    let carry = inv.carry;
    // The pair as the argument: a method returning a tuple bound to one name is reported at the
    // invocation that evaluates it.
    let run = quote_spanned! {expr.span()=>
        {
            use #rt::RunSingle as _;
            #var.__ckpt_run_single(#pair, #carry)
        }
    };
    let checkpointed = quote!(::core::result::Result::map_err(#run, #rt::convert_error));
    Ok(with_engine(site, &expr.to_token_stream(), &checkpointed))
}

fn strip_parens(mut expr: &Expr) -> &Expr {
    while let Expr::Paren(p) = expr {
        expr = &p.expr;
    }
    expr
}

/// An invocation of a checkpointable method, in any form.
struct Invocation<'a> {
    /// Evaluates to `(&Layer, LayerKwargsOwned)`.
    pair: TokenStream,
    carry: &'a Expr,
    kwargs: Vec<&'a Expr>,
}

/// Methods that adapt a result rather than invoke a layer: `layer.forward(..).map_err(..)`.
const ADAPTERS: [&str; 9] = [
    "map_err",
    "map",
    "ok",
    "unwrap",
    "expect",
    "and_then",
    "or_else",
    "context",
    "with_context",
];

/// Does `expr` look like a layer invocation: a method call whose first argument is a borrow?
fn passes_a_carry(expr: &Expr) -> bool {
    matches!(strip_parens(expr), Expr::MethodCall(call)
        if matches!(call.args.first(), Some(Expr::Reference(_))))
}

fn invocation<'a>(expr: &'a Expr, rt: &TokenStream) -> syn::Result<Invocation<'a>> {
    match strip_parens(expr) {
        Expr::MethodCall(call)
            if match strip_parens(&call.receiver) {
                Expr::Try(t) => passes_a_carry(&t.expr),
                receiver => ADAPTERS.iter().any(|a| call.method == a) && passes_a_carry(receiver),
            } =>
        {
            let method = &call.method;
            Err(syn::Error::new(
                method.span(),
                format!(
                    "`#[checkpoint]` rewrites the layer invocation itself, and `.{method}(..)` \
                     works on its result: bind the invocation first (`let ys = \
                     layer.forward(&xs, ..)?;`) and call `.{method}(..)` in the next statement"
                ),
            ))
        }
        Expr::MethodCall(call) => {
            if let Some(turbofish) = &call.turbofish {
                return Err(unsupported(
                    turbofish,
                    "a checkpointable method takes no type arguments.",
                ));
            }
            let mut args = call.args.iter();
            let Some(carry) = args.next() else {
                return Err(unsupported(
                    call,
                    "this call passes no carry: a layer invocation's first argument is the \
                     tensor that flows through the stack, e.g. `layer.forward(&xs, ..)`.",
                ));
            };
            let kwargs: Vec<&Expr> = args.collect();
            let receiver = &call.receiver;
            let twin = hidden_twin(&call.method);
            let pair = quote_spanned! {receiver.span()=>
                {
                    use #rt::Probe as _;
                    (#receiver).__ckpt_probe().#twin(#(#kwargs),*)
                }
            };
            Ok(Invocation {
                pair,
                carry,
                kwargs,
            })
        }
        Expr::Call(call) => {
            let mut args = call.args.iter();
            if let Expr::Path(path) = &*call.func
                && (path.qself.is_some() || path.path.segments.len() >= 2)
            {
                // A path call: `Layer::method(layer, &xs, ..)`.
                let twin = path_twin(path)?;
                let (Some(receiver), Some(carry)) = (args.next(), args.next()) else {
                    return Err(unsupported(
                        call,
                        "a path call `Layer::forward(layer, &xs, ..)` passes the layer, then \
                         the carry, then the keyword arguments.",
                    ));
                };
                let kwargs: Vec<&Expr> = args.collect();
                let pair = quote_spanned! {receiver.span()=>
                    #twin(#receiver, #(#kwargs),*)
                };
                return Ok(Invocation {
                    pair,
                    carry,
                    kwargs,
                });
            }
            // A closure, function or fn pointer: not something the engine can re-run. Resolving it
            // fails with `Resolve`'s message, which says so.
            let Some(carry) = args.next() else {
                return Err(unsupported(call, "this call passes no carry."));
            };
            let func = &call.func;
            let pair = quote_spanned! {func.span()=>
                {
                    use #rt::Probe as _;
                    (#func).__ckpt_probe().__checkpointable_call()
                }
            };
            Ok(Invocation {
                pair,
                carry,
                kwargs: args.collect(),
            })
        }
        other => Err(unsupported(
            other,
            "expected a layer invocation here (a method call or a path call).",
        )),
    }
}

/// The hidden twin of a path call's method, through the same path: `Block::forward` →
/// `Block::__checkpointable_forward`, `<Block>::forward` → `<Block>::__checkpointable_forward`.
///
/// Resolving the twin through the user's own path keeps the path's meaning: it compiles only
/// where the path names a checkpointable layer type (or `Self`), whose inherent method is the one
/// the engine re-runs. A trait's method (`Module::forward`, `<Block as Module>::forward`) may
/// compute something else, so naming one is an error instead of a silent switch of methods.
fn path_twin(path: &ExprPath) -> syn::Result<TokenStream> {
    let Some(method) = path.path.segments.last() else {
        return Err(unsupported(path, "expected a method path."));
    };
    let name = &method.ident;
    if !method.arguments.is_none() {
        return Err(unsupported(
            &method.arguments,
            "a checkpointable method takes no type arguments.",
        ));
    }
    if let Some(qself) = &path.qself {
        let trait_object = matches!(*qself.ty, Type::TraitObject(_) | Type::ImplTrait(_));
        if qself.position > 0 || trait_object {
            let own = if trait_object {
                format!("`Layer::{name}(layer, &xs, ..)` (naming the layer's type)")
            } else {
                format!("`{}::{name}(layer, &xs, ..)`", shown(&qself.ty))
            };
            return Err(syn::Error::new_spanned(
                path,
                format!(
                    "`{}` calls a trait's `{name}`, but `#[checkpoint]` runs the layer's own \
                     `{name}` (the inherent method that its `#[checkpointable]` impl makes \
                     checkpointable), which may compute something else: to checkpoint the \
                     layer's own method, write {own} or `layer.{name}(&xs, ..)`; to call the \
                     trait's method, remove `#[checkpoint]` from this statement",
                    shown(path)
                ),
            ));
        }
    }
    let twin = hidden_twin(name);
    let mut prefix = path.clone();
    if let Some(mut last) = prefix.path.segments.pop() {
        last.value_mut().ident = twin;
        prefix.path.segments.push(last.into_value());
    }
    Ok(prefix.to_token_stream())
}

/// `tokens` as code in a message: `<Block as Module>::forward` rather than the token string's
/// `< Block as Module > :: forward`.
fn shown(tokens: &dyn ToTokens) -> String {
    token_string(tokens)
        .replace(" :: ", "::")
        .replace(":: ", "::")
        .replace("< ", "<")
        .replace(" <", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
}

/// Does `tokens` mention the identifier `name`, directly or captured by a format string
/// (`format!("{name}")`)?
fn mentions(tokens: TokenStream, name: &Ident) -> Option<Span> {
    let captures = [format!("{{{name}}}"), format!("{{{name}:")];
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let punct = |i: Option<usize>| match i.and_then(|i| tokens.get(i)) {
        Some(TokenTree::Punct(p)) => Some((p.as_char(), p.spacing())),
        _ => None,
    };
    for (at, tt) in tokens.iter().enumerate() {
        match tt {
            TokenTree::Ident(i) if i == name => {
                // After `.` or `::` it is a field or a path segment; before `::`, a module or a
                // type. After a single `:` (`Kwargs { field: xs }`) it is the variable.
                let (before, before2) = (punct(at.checked_sub(1)), punct(at.checked_sub(2)));
                let member = matches!(before, Some(('.', _)))
                    || matches!(
                        (before2, before),
                        (Some((':', Spacing::Joint)), Some((':', _)))
                    )
                    || matches!(punct(Some(at + 1)), Some((':', Spacing::Joint)));
                if !member {
                    return Some(i.span());
                }
            }
            TokenTree::Literal(lit) => {
                let text = lit.to_string();
                if captures.iter().any(|c| text.contains(c.as_str())) {
                    return Some(lit.span());
                }
            }
            TokenTree::Group(g) => {
                if let Some(span) = mentions(g.stream(), name) {
                    return Some(span);
                }
            }
            _ => {}
        }
    }
    None
}

/// Rejects keyword arguments and per-layer `let`s that read the carry: in a stack, they are
/// evaluated before the first layer runs.
fn check_no_carry(inv: &Invocation<'_>, lets: &[&Stmt], carry: &Ident) -> syn::Result<()> {
    let exprs = inv.kwargs.iter().map(|e| e.to_token_stream());
    let stmts = lets.iter().map(|s| s.to_token_stream());
    for tokens in exprs.chain(stmts) {
        if let Some(span) = mentions(tokens, carry) {
            return Err(syn::Error::new(
                span,
                format!(
                    "inside a checkpointed stack, only the carry argument may read `{carry}`: \
                     the engine evaluates every layer's keyword arguments before it runs the \
                     stack, so they would see `{carry}` as it was before the first layer. Compute \
                     what depends on `{carry}` inside the layer"
                ),
            ));
        }
    }
    Ok(())
}

/// The first `?` or `return` in `stmts` that would leave the closure they are written in (those
/// inside nested closures, async blocks and items leave only those).
fn early_exit(stmts: &[&Stmt]) -> Option<Span> {
    #[derive(Default)]
    struct Find(Option<Span>);
    impl<'ast> Visit<'ast> for Find {
        fn visit_expr_try(&mut self, e: &'ast syn::ExprTry) {
            self.0.get_or_insert(e.question_token.span);
        }
        fn visit_expr_return(&mut self, e: &'ast syn::ExprReturn) {
            self.0.get_or_insert(e.return_token.span);
        }
        fn visit_macro(&mut self, m: &'ast syn::Macro) {
            // Macro arguments are tokens, not expressions: look for the tokens themselves.
            let exit = m.tokens.clone().into_iter().find(|tt| match tt {
                TokenTree::Punct(p) => p.as_char() == '?',
                TokenTree::Ident(i) => i == "return",
                _ => false,
            });
            if let Some(tt) = exit {
                self.0.get_or_insert(tt.span());
            }
        }
        fn visit_expr_closure(&mut self, _: &'ast syn::ExprClosure) {}
        fn visit_expr_async(&mut self, _: &'ast syn::ExprAsync) {}
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    let mut find = Find::default();
    for stmt in stmts {
        find.visit_stmt(stmt);
    }
    find.0
}

/// Checks that the invocation's carry argument is `&CARRY`.
fn check_carry_arg(inv: &Invocation<'_>, carry: &dyn ToTokens) -> syn::Result<()> {
    let ok = matches!(inv.carry, Expr::Reference(r) if r.mutability.is_none()
        && token_string(&r.expr) == token_string(carry));
    if ok {
        Ok(())
    } else {
        let carry = token_string(carry);
        Err(syn::Error::new_spanned(
            inv.carry,
            format!(
                "in a checkpointed stack, each layer's carry argument is `&{carry}`, the value the \
                 previous layer produced (`{carry} = layer.forward(&{carry}, ..)?`)"
            ),
        ))
    }
}

fn ident_of(expr: &Expr) -> Option<&Ident> {
    match expr {
        Expr::Path(p) if p.qself.is_none() => p.path.get_ident(),
        _ => None,
    }
}

/// `for PAT in ITER { LETS; CARRY = INVOCATION?; }` → one `run_stack`.
fn for_loop_stmt(for_loop: &ExprForLoop, site: Site<'_>) -> syn::Result<TokenStream> {
    let rt = site.rt;
    let var = engine_var();
    let calls = calls_var();
    let stmts = &for_loop.body.stmts;
    let Some((last, lets)) = stmts.split_last() else {
        return Err(unsupported(&for_loop.body, "this loop has an empty body."));
    };
    if let Some(at) = stmts.iter().rposition(|s| matches!(s, Stmt::Local(_)))
        && at + 1 < stmts.len()
        && let Stmt::Local(local) = &stmts[at]
        && matches!(strip_pat(&local.pat), Pat::Tuple(_))
    {
        return multi_loop(for_loop, &stmts[..at], local, &stmts[at + 1..], site);
    }
    let lets: Vec<&Stmt> = lets.iter().collect();
    for stmt in &lets {
        if !matches!(stmt, Stmt::Local(_)) {
            return Err(unsupported(
                stmt,
                "inside a `#[checkpoint]` loop, only `let` statements may come before \
                 `CARRY = INVOCATION?;`.",
            ));
        }
    }
    let (carry, call) = match last {
        Stmt::Expr(Expr::Assign(assign), _) => match &*assign.right {
            Expr::Try(t) => (&*assign.left, &*t.expr),
            other => {
                return Err(unsupported(
                    other,
                    "the loop's assignment must end in `?`: `CARRY = INVOCATION?;`.",
                ));
            }
        },
        other => {
            return Err(unsupported(
                other,
                "the body of a `#[checkpoint]` loop ends with `CARRY = INVOCATION?;`.",
            ));
        }
    };
    let Some(carry_name) = ident_of(carry) else {
        return Err(unsupported(
            carry,
            "the carry of a `#[checkpoint]` loop is a local variable, `xs = layer.forward(&xs, \
             ..)?;`: copy a field or a dereference into a local before the loop and store it \
             back after.",
        ));
    };
    let inv = invocation(call, rt)?;
    check_carry_arg(&inv, carry)?;
    check_no_carry(&inv, &lets, carry_name)?;
    let label = &for_loop.label;
    let pat = &for_loop.pat;
    let iter = &for_loop.expr;
    let pair = &inv.pair;
    let carry_arg = inv.carry;
    let checkpointed = quote! {{
        let mut #calls = #rt::Vec::new();
        #label for #pat in #iter {
            #(#lets)*
            #calls.push(#pair);
        }
        #carry = #rt::candle_result(#var.run_stack(#carry_arg, #calls))?;
    }};
    let plain = quote!({ #for_loop });
    Ok(with_engine(site, &plain, &checkpointed))
}

/// `ITER.try_fold(INIT, |ACC, ITEM| INVOCATION)` → one `run_stack`.
fn fold(call: &ExprMethodCall, site: Site<'_>) -> syn::Result<TokenStream> {
    let rt = site.rt;
    let var = engine_var();
    let calls = calls_var();
    let shape = "a checkpointed fold is `ITER.try_fold(INIT, |ACC, ITEM| INVOCATION)`.";
    let args: Vec<&Expr> = call.args.iter().collect();
    let [init, Expr::Closure(closure)] = args.as_slice() else {
        return Err(unsupported(&call.args, shape));
    };
    let inputs: Vec<&Pat> = closure.inputs.iter().collect();
    let [acc, item] = inputs.as_slice() else {
        return Err(unsupported(&closure.inputs, shape));
    };
    let strip = |p: &'_ Pat| -> Pat {
        match p {
            Pat::Type(t) => (*t.pat).clone(),
            other => other.clone(),
        }
    };
    let (acc, item) = (strip(acc), strip(item));
    let Pat::Ident(acc_ident) = &acc else {
        return Err(unsupported(
            &acc,
            "the fold's accumulator must be a plain name.",
        ));
    };
    let acc_ident = &acc_ident.ident;
    let (lets, body): (Vec<&Stmt>, &Expr) = match &*closure.body {
        Expr::Block(b) => match b.block.stmts.split_last() {
            Some((Stmt::Expr(e, None), lets))
                if lets.iter().all(|s| matches!(s, Stmt::Local(_))) =>
            {
                (lets.iter().collect(), e)
            }
            _ => {
                return Err(unsupported(
                    &closure.body,
                    "the fold's closure body is an invocation, optionally after `let` \
                     statements.",
                ));
            }
        },
        other => (Vec::new(), other),
    };
    if let Some(span) = early_exit(&lets) {
        return Err(syn::Error::new(
            span,
            "inside a checkpointed fold, the `let`s before the invocation run for every layer \
             before the stack does, outside the closure: a `?` or `return` there would leave the \
             enclosing function instead of ending the fold. Compute the value inside the layer, \
             or write the stack as a `#[checkpoint]` `for` loop",
        ));
    }
    let inv = invocation(body, rt)?;
    check_carry_arg(&inv, acc_ident)?;
    check_no_carry(&inv, &lets, acc_ident)?;
    let iter = &call.receiver;
    let pair = &inv.pair;
    let checkpointed = quote! {{
        let mut #calls = #rt::Vec::new();
        for #item in #iter {
            #(#lets)*
            #calls.push(#pair);
        }
        ::core::result::Result::map_err(
            #var.run_stack(&(#init), #calls),
            #rt::convert_error,
        )
    }};
    Ok(with_engine(site, &call.to_token_stream(), &checkpointed))
}

fn strip_pat(pat: &Pat) -> &Pat {
    match pat {
        Pat::Type(t) => &t.pat,
        other => other,
    }
}

const MULTI: &str = "a `#[checkpoint]` loop over layers returning a tuple is written \
    `for PAT in ITER { LETS; let (P0, P1, ..) = INVOCATION?; CARRY = P0; .. VEC.push(Pk); .. }`: \
    after the invocation, one `CARRY = Pk;` per carry tensor (the first elements, in the order \
    of the carry argument) and one `VEC.push(Pk);` per auxiliary output, nothing else";

/// `for PAT in ITER { LETS; let (P..) = INVOCATION?; C = P; V.push(P); }` → one
/// `run_stack_outputs`.
fn multi_loop(
    for_loop: &ExprForLoop,
    lets: &[Stmt],
    local: &Local,
    tail: &[Stmt],
    site: Site<'_>,
) -> syn::Result<TokenStream> {
    let rt = site.rt;
    let var = engine_var();
    let calls = calls_var();
    let lets: Vec<&Stmt> = lets.iter().collect();
    for stmt in &lets {
        if !matches!(stmt, Stmt::Local(_)) {
            return Err(unsupported(stmt, MULTI));
        }
    }
    let Pat::Tuple(tuple) = strip_pat(&local.pat) else {
        return Err(unsupported(&local.pat, MULTI));
    };
    let mut names = Vec::new();
    for elem in &tuple.elems {
        match elem {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => names.push(&p.ident),
            other => {
                return Err(unsupported(
                    other,
                    "bind each tensor the layer returns to a plain name.",
                ));
            }
        }
    }
    let call = match &local.init {
        Some(LocalInit {
            expr,
            diverge: None,
            ..
        }) => match &**expr {
            Expr::Try(t) => &*t.expr,
            other => return Err(unsupported(other, MULTI)),
        },
        _ => return Err(unsupported(local, MULTI)),
    };
    let inv = invocation(call, rt)?;
    // The carry argument: `&xs`, or `(&xs, &residual)`.
    let carry_args: Vec<&Expr> = match strip_parens(inv.carry) {
        Expr::Tuple(t) => t.elems.iter().collect(),
        other => vec![other],
    };
    let mut carries = Vec::new();
    for arg in &carry_args {
        let name = match arg {
            Expr::Reference(r) if r.mutability.is_none() => ident_of(&r.expr),
            _ => None,
        };
        match name {
            Some(name) => carries.push(name),
            None => {
                return Err(syn::Error::new_spanned(
                    arg,
                    "in a checkpointed stack, each carry argument is `&CARRY`, a local variable \
                     that the statements after the invocation set to what the layer returned \
                     (`CARRY = P0;`)",
                ));
            }
        }
    }
    let n = carries.len();
    if names.len() < n.max(2) {
        return Err(unsupported(
            &local.pat,
            "the pattern binds fewer tensors than the carry has (plus at least one auxiliary \
             output for a single carry).",
        ));
    }
    // Each bound name: the carry it is assigned to, or the vector it is pushed onto.
    let mut used = vec![false; names.len()];
    let mut pushes: Vec<Option<&Expr>> = vec![None; names.len() - n];
    for stmt in tail {
        let (k, right) = match stmt {
            Stmt::Expr(Expr::Assign(a), Some(_)) => {
                let (Some(left), Some(right)) = (ident_of(&a.left), ident_of(&a.right)) else {
                    return Err(unsupported(stmt, MULTI));
                };
                let Some(k) = names.iter().position(|p| *p == right).filter(|k| *k < n) else {
                    return Err(unsupported(
                        &a.right,
                        "only the carry elements (the first of the pattern, one per carry \
                         argument) are assigned after the invocation.",
                    ));
                };
                if carries[k] != left {
                    return Err(syn::Error::new_spanned(
                        &a.left,
                        format!(
                            "element {k} of the layer's output is the new `{}` (the carry \
                             argument in that position): assign it there",
                            carries[k]
                        ),
                    ));
                }
                (k, right)
            }
            Stmt::Expr(Expr::MethodCall(m), Some(_))
                if m.method == "push" && m.args.len() == 1 && m.turbofish.is_none() =>
            {
                let Some(right) = m.args.first().and_then(ident_of) else {
                    return Err(unsupported(stmt, MULTI));
                };
                let Some(k) = names.iter().position(|p| *p == right).filter(|k| *k >= n) else {
                    return Err(unsupported(
                        &m.args,
                        "only auxiliary outputs (the elements after the carry) are pushed.",
                    ));
                };
                pushes[k - n] = Some(&*m.receiver);
                (k, right)
            }
            other => return Err(unsupported(other, MULTI)),
        };
        if std::mem::replace(&mut used[k], true) {
            return Err(syn::Error::new_spanned(
                right,
                format!("`{right}` is used twice after the invocation: use it once"),
            ));
        }
    }
    if let Some(k) = used.iter().position(|u| !u) {
        return Err(syn::Error::new_spanned(
            names[k],
            format!(
                "`{}` is not used after the invocation: {}",
                names[k],
                if k < n {
                    format!("assign it to the carry, `{} = {};`", carries[k], names[k])
                } else {
                    format!("push it onto a vector, `outputs.push({});`", names[k])
                }
            ),
        ));
    }
    for carry in &carries {
        check_no_carry(&inv, &lets, carry)?;
    }
    let label = &for_loop.label;
    let pat = &for_loop.pat;
    let iter = &for_loop.expr;
    let pair = &inv.pair;
    let out = Ident::new("__ckpt_out", Span::mixed_site());
    let aux = Ident::new("__ckpt_aux", Span::mixed_site());
    let carry_vars: Vec<Ident> = (0..n)
        .map(|i| quote::format_ident!("__ckpt_c{}", i, span = Span::mixed_site()))
        .collect();
    let aux_vars: Vec<Ident> = (n..names.len())
        .map(|i| quote::format_ident!("__ckpt_a{}", i, span = Span::mixed_site()))
        .collect();
    // Every auxiliary name is used (checked above), so every slot holds its vector.
    let vecs: Vec<&Expr> = pushes.iter().flatten().copied().collect();
    let aux_count = aux_vars.len();
    let checkpointed = quote! {{
        let mut #calls = #rt::Vec::new();
        #label for #pat in #iter {
            #(#lets)*
            #calls.push(#pair);
        }
        let #out = #rt::candle_outputs(
            #var.run_stack_outputs(&[#(::core::clone::Clone::clone(&#carries)),*], #calls),
        )?;
        let [#(#carry_vars),*] = #rt::take_n::<#n>(#out.carry, "carry tensors")?;
        #( #carries = #carry_vars; )*
        for #aux in #out.aux {
            let [#(#aux_vars),*] = #rt::take_n::<#aux_count>(#aux, "auxiliary outputs")?;
            #( #vecs.push(#aux_vars); )*
        }
    }};
    let plain = quote!({ #for_loop });
    Ok(with_engine(site, &plain, &checkpointed))
}

/// What a marked `let` of a tuple is.
const MULTI_LET: &str = "a marked `let` of a tuple names every tensor the layer returns, in \
    order (the new carry, one element per carry tensor, then the auxiliary outputs), each with a \
    plain name or `_`: `let (h, logits) = layer.forward(&xs, mask)?;`";

/// `let (P0, P1, ..) = INVOCATION?;` → a stack of one through `run_stack_outputs`.
fn multi_let(
    local: &Local,
    tuple: &syn::PatTuple,
    init: &Expr,
    site: Site<'_>,
) -> syn::Result<Stmt> {
    let rt = site.rt;
    let var = engine_var();
    for elem in &tuple.elems {
        match elem {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {}
            Pat::Wild(_) => {}
            Pat::Rest(_) => {
                return Err(syn::Error::new_spanned(
                    elem,
                    format!("`..` leaves out how many tensors the layer returns: {MULTI_LET}"),
                ));
            }
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    format!(
                        "bind this tensor to a plain name, and borrow or destructure it in the \
                         next statement: {MULTI_LET}"
                    ),
                ));
            }
        }
    }
    let n = tuple.elems.len();
    if n < 2 {
        return Err(syn::Error::new_spanned(
            tuple,
            format!("a layer returning a tuple returns at least two tensors: {MULTI_LET}"),
        ));
    }
    let Expr::Try(t) = init else {
        return Err(syn::Error::new_spanned(
            init,
            format!(
                "end the invocation with `?`: the pattern binds the tensors, not the \
                 `Result`: {MULTI_LET}"
            ),
        ));
    };
    let call = &*t.expr;
    if let Expr::MethodCall(m) = strip_parens(call)
        && m.method == "try_fold"
    {
        return Err(unsupported(
            &m.method,
            "a checkpointed fold carries one tensor: for layers returning a tuple, write a \
             `#[checkpoint]` `for` loop, `for layer in ITER { let (h, aux) = \
             layer.forward(&xs, ..)?; xs = h; outputs.push(aux); }`.",
        ));
    }
    let inv = invocation(call, rt)?;
    // The carry argument: `&xs` (any expression of type `&Tensor`), or a tuple `(&h, &r)`.
    let carries: Vec<&Expr> = match strip_parens(inv.carry) {
        Expr::Tuple(t) => t.elems.iter().collect(),
        other => vec![other],
    };
    let carries = carries
        .iter()
        .map(|c| quote_spanned!(c.span()=> <#rt::Tensor as ::core::clone::Clone>::clone(#c)));
    let layer = Ident::new("__ckpt_layer", Span::mixed_site());
    let kwargs = Ident::new("__ckpt_kwargs", Span::mixed_site());
    let outs: Vec<Ident> = (0..n)
        .map(|i| quote::format_ident!("__ckpt_o{}", i, span = Span::mixed_site()))
        .collect();
    let pair = &inv.pair;
    let checkpointed = quote! {{
        let (#layer, #kwargs) = #pair;
        ::core::result::Result::map(
            ::core::result::Result::map_err(
                #rt::outputs_of_one::<#n>(
                    #var.run_stack_outputs(&[#(#carries),*], [(#layer, #kwargs)]),
                ),
                #rt::convert_error,
            ),
            |[#(#outs),*]| (#(#outs),*),
        )
    }};
    let q = &t.question_token;
    let value = with_engine(site, &call.to_token_stream(), &checkpointed);
    let mut local = local.clone();
    local.init = Some(LocalInit {
        eq_token: local
            .init
            .as_ref()
            .map_or_else(Default::default, |i| i.eq_token),
        expr: Box::new(syn::parse2(quote!((#value) #q))?),
        diverge: None,
    });
    Ok(Stmt::Local(local))
}
