//! Fuzzing the attribute: malformed and adversarial items never make it panic (a panicking proc
//! macro is an internal compiler error for the user), an item that does not parse comes back with
//! a `compile_error!`, and the expansion of an item that parses is itself valid Rust, so that
//! every mistake is reported by the macro's own message rather than by rustc failing to parse
//! generated code.
//!
//! The inputs are token-level mutations (truncate, drop, duplicate, swap, replace, insert,
//! regroup) of valid layers and models and of known-bad ones. The macro's logic is on
//! `proc_macro2` only, so this test compiles the same modules (`#[path]`) and calls them
//! directly.

use std::panic::{AssertUnwindSafe, catch_unwind};

use proc_macro2::{Delimiter, Group, Ident, Literal, Punct, Spacing, Span, TokenStream, TokenTree};
use proptest::prelude::*;
use proptest::test_runner::Config;

#[allow(dead_code, clippy::all, clippy::pedantic, unreachable_pub)]
#[path = "../checkpoint-derive/src/imp/mod.rs"]
mod imp;

/// Valid and known-bad inputs: the attribute's arguments and the annotated item.
const SEEDS: &[(&str, &str)] = &[
    ("", "#[derive(Clone)] struct Block { w: Tensor }"),
    ("", "struct Pair(Tensor, Tensor);"),
    (
        "",
        "impl Block { fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> { xs * scale } }",
    ),
    (
        "methods(forward, forward_t)",
        "impl<A: Act, const N: usize> Dense<A, N> where A: Clone, { pub fn forward(&self, xs: &Tensor) -> Result<Tensor> { Ok(xs.clone()) } pub(crate) fn forward_t(&self, xs: &Tensor, train: bool, names: &[String], s: &str) -> Result<Tensor> { Ok(xs.clone()) } }",
    ),
    (
        "engine = ckpt",
        "fn run(layers: &[Block], xs: &Tensor, ckpt: Option<&Checkpointer>) -> Result<Tensor> { let mut xs = xs.clone(); #[checkpoint] for (i, layer) in layers.iter().enumerate() { let s = scale(i); xs = layer.forward(&xs, None, s)?; } Ok(xs) }",
    ),
    (
        "engine = self.ckpt, crate = ::my::rt",
        "impl Model { fn forward(&self, xs: &Tensor) -> Result<Tensor> { #[checkpoint] let ys = self.layers.iter().try_fold(xs.clone(), |xs, l| l.forward(&xs, Some(&m), 1.0))?; #[checkpoint] let zs = Block::forward(&self.b, &ys, None, 2.0)?; #[checkpoint] let zs = <Block>::forward(&self.b, &zs)?; #[checkpoint] let zs = self.p.call(&zs)?; #[checkpoint] let zs = self.b.call_kw(&zs, BlockKwargs { mask: None, scale: 1.0 })?; Ok(zs) } }",
    ),
    (
        "engine = ckpt",
        "fn bad(l: &Block, xs: &Tensor, ckpt: &Checkpointer) -> Result<Tensor> { #[checkpoint] let ys = <Block as Module>::forward(l, xs)?; #[checkpoint] let ys = <dyn Module>::forward(l, &ys)?; #[checkpoint] let ys = l.forward(&ys).map_err(f)?; #[checkpoint] let ys = l.forward::<u8>(&ys)?; #[checkpoint] let ys = f(&ys)?; #[checkpoint] let Some(ys) = g(&ys) else { return e }; fn inner() { #[checkpoint] let a = b.forward(&c)?; } Ok(ys) }",
    ),
    (
        "methods(forward, forward, missing)",
        "impl Block { async unsafe fn forward<T>(&mut self, xs: Tensor, (a, b): (u8, u8), k: &mut Tensor, d: &dyn Fn(), i: impl Fn(), p: *const u8, n: &[&Tensor], s: Self, t: T, u: _) -> (Tensor, Tensor) { todo!() } fn nothing(self: Box<Self>) {} fn carryless(&self) -> Result<Tensor> { todo!() } fn by_value(self, xs: &Tensor) -> Result<Tensor> { todo!() } fn rc(self: &Rc<Self>, xs: &Tensor) {} fn none() {} }",
    ),
    ("engine", "enum E { A, B }"),
    ("methods", "trait T { fn forward(&self); }"),
    ("engine = , unknown(1), crate", "union U { a: u8 }"),
    (
        "",
        "impl Module for Block { fn forward(&self, xs: &Tensor) -> Result<Tensor> { Ok(xs.clone()) } }",
    ),
    (
        "",
        "impl <Block as Tr>::Assoc { fn forward(&self, xs: &Tensor) -> Result<Tensor> { todo!() } }",
    ),
    ("engine = ckpt", "fn nothing_marked() {}"),
    (
        "",
        "fn no_engine() { #[checkpoint] let a = b.forward(&c)?; }",
    ),
    (
        "engine = ckpt",
        "fn weird() { #[checkpoint] for x in y {} #[checkpoint] for x in y { a; b = c?; } #[checkpoint] for x in y { self.b = l.forward(&self.b)?; } #[checkpoint] for x in y { b = l.forward(&c)?; } #[checkpoint] for x in y { b = l.forward(&b, b)?; } #[checkpoint] let a = it.try_fold(x, |(a, b), c| c.forward(&a))?; #[checkpoint] let a = it.try_fold(x, |a, c| { let z = q?; c.forward(&a) })?; #[checkpoint] x; #[checkpoint] a = b; #[checkpoint] mac!(); }",
    ),
];

/// Identifiers that mean something to the macro, to Rust, or nothing at all.
const IDENTS: &str = "self Self forward checkpoint checkpointable methods engine crate fn impl \
    struct where async unsafe mut dyn for in let Tensor Option Result try_fold call call_kw r#type _ \
    static Box xs";

const PUNCTS: &[char] = &[
    '&', '?', ',', ';', ':', '<', '>', '=', '#', '.', '*', '|', '!', '\'',
];

/// One token of a flattened stream: groups become open and close markers, so that mutations
/// reach inside nested groups and can unbalance them.
#[derive(Clone, Debug)]
enum Flat {
    Token(TokenTree),
    Open(Delimiter),
    Close,
}

fn flatten(stream: TokenStream, out: &mut Vec<Flat>) {
    for tt in stream {
        match tt {
            TokenTree::Group(g) => {
                out.push(Flat::Open(g.delimiter()));
                flatten(g.stream(), out);
                out.push(Flat::Close);
            }
            other => out.push(Flat::Token(other)),
        }
    }
}

/// How deep rebuilt groups nest, at most: syn parses nested groups recursively, and a stack
/// overflow is an abort, not a panic this test could report.
const MAX_DEPTH: usize = 24;

/// Rebuilds a stream, closing unclosed groups and dropping unmatched closes.
fn rebuild(flat: &[Flat]) -> TokenStream {
    let mut stack: Vec<(Delimiter, Vec<TokenTree>)> = vec![(Delimiter::None, Vec::new())];
    for f in flat {
        match f {
            Flat::Token(tt) => {
                if let Some((_, v)) = stack.last_mut() {
                    v.push(tt.clone());
                }
            }
            Flat::Open(d) if stack.len() <= MAX_DEPTH => stack.push((*d, Vec::new())),
            Flat::Open(_) => {}
            Flat::Close if stack.len() > 1 => close(&mut stack),
            Flat::Close => {}
        }
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    stack
        .pop()
        .map(|(_, v)| v.into_iter().collect())
        .unwrap_or_default()
}

fn close(stack: &mut Vec<(Delimiter, Vec<TokenTree>)>) {
    if let Some((d, v)) = stack.pop() {
        let group = Group::new(d, v.into_iter().collect());
        if let Some((_, parent)) = stack.last_mut() {
            parent.push(TokenTree::Group(group));
        }
    }
}

/// One random token.
fn token(choice: usize) -> Flat {
    let idents: Vec<&str> = IDENTS.split_whitespace().collect();
    let n = idents.len() + PUNCTS.len() + 5;
    match choice % n {
        i if i < idents.len() => {
            let name = idents[i];
            let ident = match name.strip_prefix("r#") {
                Some(raw) => Ident::new_raw(raw, Span::call_site()),
                None => Ident::new(name, Span::call_site()),
            };
            Flat::Token(TokenTree::Ident(ident))
        }
        i if i < idents.len() + PUNCTS.len() => {
            let spacing = if i % 2 == 0 {
                Spacing::Alone
            } else {
                Spacing::Joint
            };
            Flat::Token(TokenTree::Punct(Punct::new(
                PUNCTS[i - idents.len()],
                spacing,
            )))
        }
        i => match i - idents.len() - PUNCTS.len() {
            0 => Flat::Token(TokenTree::Literal(Literal::usize_unsuffixed(choice))),
            1 => Flat::Token(TokenTree::Literal(Literal::string("{xs}"))),
            2 => Flat::Open(Delimiter::Parenthesis),
            3 => Flat::Open(Delimiter::Brace),
            _ => Flat::Close,
        },
    }
}

/// A mutation of a flattened stream, by random numbers.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    Replace(usize, usize),
    Insert(usize, usize),
    /// Repeats a slice many times: long streams.
    Repeat(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>;
    prop_oneof![
        at().prop_map(Mutation::Truncate),
        at().prop_map(Mutation::Drop),
        at().prop_map(Mutation::Duplicate),
        (at(), at()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (at(), at()).prop_map(|(a, b)| Mutation::Replace(a, b)),
        (at(), at()).prop_map(|(a, b)| Mutation::Insert(a, b)),
        (at(), 1..8usize, 2..200usize).prop_map(|(a, len, n)| Mutation::Repeat(a, len, n)),
    ]
}

fn apply(flat: &mut Vec<Flat>, m: &Mutation) {
    if flat.is_empty() {
        if let Mutation::Insert(_, t) = m {
            flat.push(token(*t));
        }
        return;
    }
    let len = flat.len();
    match *m {
        Mutation::Truncate(at) => flat.truncate(at % len),
        Mutation::Drop(at) => {
            flat.remove(at % len);
        }
        Mutation::Duplicate(at) => flat.insert(at % len, flat[at % len].clone()),
        Mutation::Swap(a, b) => flat.swap(a % len, b % len),
        Mutation::Replace(at, t) => flat[at % len] = token(t),
        Mutation::Insert(at, t) => flat.insert(at % (len + 1), token(t)),
        Mutation::Repeat(at, n, times) => {
            let start = at % len;
            let end = (start + n).min(len);
            let slice: Vec<Flat> = flat[start..end].to_vec();
            let tail = flat.split_off(end);
            for _ in 0..times {
                flat.extend(slice.iter().cloned());
            }
            flat.extend(tail);
        }
    }
}

fn mutate(source: &str, mutations: &[Mutation]) -> TokenStream {
    let stream: TokenStream = source.parse().unwrap_or_default();
    let mut flat = Vec::new();
    flatten(stream, &mut flat);
    for m in mutations {
        apply(&mut flat, m);
    }
    rebuild(&flat)
}

/// Runs the attribute and checks what it returns; `Err` says what is wrong.
fn check(args: TokenStream, item: TokenStream) -> Result<(), String> {
    let parses = syn::parse2::<syn::Item>(item.clone()).is_ok();
    let shown = format!("args: `{args}`\nitem: `{item}`");
    let out = catch_unwind(AssertUnwindSafe(|| imp::checkpointable(args, item)))
        .map_err(|_| format!("the macro panicked on\n{shown}"))?;
    let text = out.to_string();
    if !parses {
        // The item comes back untouched, with syn's reason.
        if !text.contains("compile_error") {
            return Err(format!(
                "an item that does not parse got no `compile_error!`\n{shown}"
            ));
        }
        return Ok(());
    }
    if let Err(err) = syn::parse2::<syn::File>(out) {
        return Err(format!(
            "the expansion does not parse ({err}):\n{text}\nfor\n{shown}"
        ));
    }
    Ok(())
}

fn config(cases: u32) -> Config {
    Config {
        cases,
        // A failure is kept as a plain test below, not in a file next to the sources.
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(384))]

    /// Mutated items, with their own (valid or known-bad) arguments.
    #[test]
    fn mutated_items_never_panic(
        seed in 0..SEEDS.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let (args, item) = SEEDS[seed];
        let args: TokenStream = args.parse().unwrap_or_default();
        check(args, mutate(item, &mutations)).map_err(TestCaseError::fail)?;
    }

    /// Mutated arguments, on valid items.
    #[test]
    fn mutated_arguments_never_panic(
        seed in 0..SEEDS.len(),
        args in 0..SEEDS.len(),
        mutations in proptest::collection::vec(mutation(), 0..5),
    ) {
        let item: TokenStream = SEEDS[seed].1.parse().unwrap_or_default();
        check(mutate(SEEDS[args].0, &mutations), item).map_err(TestCaseError::fail)?;
    }

    /// Random token soup, as arguments and as the item.
    #[test]
    fn random_tokens_never_panic(
        args in proptest::collection::vec(any::<usize>(), 0..12),
        item in proptest::collection::vec(any::<usize>(), 0..64),
    ) {
        let args: Vec<Flat> = args.into_iter().map(token).collect();
        let item: Vec<Flat> = item.into_iter().map(token).collect();
        check(rebuild(&args), rebuild(&item)).map_err(TestCaseError::fail)?;
    }
}

/// Every seed expands (valid ones to code, known-bad ones to errors) and parses.
#[test]
fn seeds_expand_to_valid_rust() {
    for (args, item) in SEEDS {
        let result = check(
            args.parse().unwrap_or_default(),
            item.parse().unwrap_or_default(),
        );
        assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
    }
}

/// The known-bad seeds are reported with `compile_error!`s, and the valid ones without.
#[test]
fn bad_seeds_are_errors() {
    for (i, (args, item)) in SEEDS.iter().enumerate() {
        let out = imp::checkpointable(
            args.parse().unwrap_or_default(),
            item.parse().unwrap_or_default(),
        );
        let errors = out.to_string().contains("compile_error");
        assert_eq!(errors, i >= 6, "seed {i}: `{args}` on `{item}`");
    }
}

/// A long, deeply repeated stream is handled in time and without overflowing the stack.
#[test]
fn long_streams() {
    let body = "#[checkpoint] let xs = layer.forward(&xs)?; ".repeat(2000);
    let item = format!("fn run(ckpt: &Checkpointer) {{ {body} }}");
    let result = check(
        quote::quote!(engine = ckpt),
        item.parse().unwrap_or_default(),
    );
    assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
    let nested = format!("{}x{}", "(".repeat(48), ")".repeat(48));
    let item =
        format!("fn run(ckpt: &Checkpointer) {{ #[checkpoint] let y = {nested}.forward(&x)?; }}");
    let result = check(
        quote::quote!(engine = ckpt),
        item.parse().unwrap_or_default(),
    );
    assert!(result.is_ok(), "{}", result.err().unwrap_or_default());
}
