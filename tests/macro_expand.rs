//! The expansion of a representative layer and model, checked in as a reviewed snapshot
//! (`tests/snapshots/expand.rs.snap`). Run with `UPDATE_SNAPSHOTS=1` to accept a change, then
//! review the diff of the snapshot file.
//!
//! The macro's logic lives in `checkpoint-derive/src/imp/`, on `proc_macro2` only, so this test
//! compiles the same modules (`#[path]`) and calls them directly: no `cargo expand`, no nightly,
//! no second copy of the code.

use std::fmt::Write as _;
use std::path::Path;

#[allow(dead_code, clippy::all, clippy::pedantic, unreachable_pub)]
#[path = "../checkpoint-derive/src/imp/mod.rs"]
mod imp;

/// The snapshot's input compiles with the real macro.
#[allow(dead_code, unreachable_pub)]
mod input {
    include!("snapshots/expand_input.rs");
}

/// Expands every `#[checkpointable]` item of `source` (other items are kept as they are).
fn expand(source: &str) -> String {
    let file = syn::parse_file(source).expect("the snapshot input parses");
    let mut out = proc_macro2::TokenStream::new();
    for item in file.items {
        let mut item = item;
        let attrs = match &mut item {
            syn::Item::Struct(i) => Some(&mut i.attrs),
            syn::Item::Impl(i) => Some(&mut i.attrs),
            syn::Item::Fn(i) => Some(&mut i.attrs),
            _ => None,
        };
        let marker = attrs.and_then(|attrs| {
            let pos = attrs
                .iter()
                .position(|a| a.path().is_ident("checkpointable"))?;
            Some(attrs.remove(pos))
        });
        let expanded = match marker {
            Some(attr) => {
                let args = match attr.meta {
                    syn::Meta::List(list) => list.tokens,
                    _ => proc_macro2::TokenStream::new(),
                };
                imp::checkpointable(args, quote::quote!(#item))
            }
            // Expand the `#[checkpointable]` methods of a plain impl (the model's forward).
            None => expand_methods(item),
        };
        out.extend(expanded);
    }
    let file: syn::File = syn::parse2(out).expect("the expansion parses");
    prettyplease::unparse(&file)
}

fn expand_methods(item: syn::Item) -> proc_macro2::TokenStream {
    let syn::Item::Impl(mut block) = item else {
        return quote::quote!(#item);
    };
    for it in &mut block.items {
        let syn::ImplItem::Fn(f) = it else { continue };
        let Some(pos) = f
            .attrs
            .iter()
            .position(|a| a.path().is_ident("checkpointable"))
        else {
            continue;
        };
        let attr = f.attrs.remove(pos);
        let args = match attr.meta {
            syn::Meta::List(list) => list.tokens,
            _ => proc_macro2::TokenStream::new(),
        };
        let expanded = imp::checkpointable(args, quote::quote!(#f));
        *f = syn::parse2(expanded).expect("a method expands to a method");
    }
    quote::quote!(#block)
}

fn diff(expected: &str, actual: &str) -> String {
    let mut out = String::new();
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    for i in 0..e.len().max(a.len()) {
        match (e.get(i), a.get(i)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => {
                let _ = writeln!(out, "line {}:", i + 1);
                if let Some(x) = x {
                    let _ = writeln!(out, "- {x}");
                }
                if let Some(y) = y {
                    let _ = writeln!(out, "+ {y}");
                }
            }
        }
    }
    out
}

#[test]
fn expansion_matches_the_snapshot() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots");
    let input = std::fs::read_to_string(root.join("expand_input.rs")).expect("read the input");
    let actual = expand(&input);
    let path = root.join("expand.rs.snap");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &actual).expect("write the snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "the expansion of tests/snapshots/expand_input.rs changed:\n{}\n\
         If the change is intended, run\n    \
         UPDATE_SNAPSHOTS=1 cargo test -p checkpoint-tests --test macro_expand\n\
         and review the diff of tests/snapshots/expand.rs.snap.",
        diff(&expected, &actual)
    );
}

/// `crate = PATH` puts every path of the generated code under `PATH`: a crate that re-exports
/// the runtime, or renames the dependency, works without `::checkpoint_runtime` in scope.
#[test]
fn a_crate_path_replaces_the_runtime_path_everywhere() {
    let input = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/expand_input.rs"),
    )
    .expect("read the input");
    let with_path = input
        .replace("use checkpoint_runtime::", "use facade::ckpt::")
        .replace(
            "#[checkpointable]",
            "#[checkpointable(crate = ::facade::ckpt)]",
        )
        .replace(
            "#[checkpointable(engine",
            "#[checkpointable(crate = ::facade::ckpt, engine",
        );
    assert_ne!(with_path, input, "the input has no attribute to rewrite");
    let actual = expand(&with_path);
    assert!(
        !actual.contains("checkpoint_runtime"),
        "a path still names the runtime crate:\n{actual}"
    );
    assert_eq!(
        actual.matches("::facade::ckpt::__private").count(),
        expand(&input)
            .matches("::checkpoint_runtime::__private")
            .count(),
        "{actual}"
    );
}
