//! `FAULTS.md` promises that every bad input and fault it lists is a test. This keeps it so:
//! every test it cites exists, and every compile-fail UI case is in the table.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// The repository root (this crate lives in `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The cited tests: every `` `path.rs::name` `` or `` `path.rs` `` in the table's last column.
fn citations(table: &str) -> Vec<String> {
    table
        .lines()
        .filter(|line| line.starts_with('|'))
        .filter_map(|line| line.trim_end_matches('|').rsplit('|').next())
        .flat_map(|cell| {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .filter(|c| c.contains(".rs"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_cited_test_exists() {
    let root = root();
    let table = fs::read_to_string(root.join("FAULTS.md")).expect("FAULTS.md at the root");
    let cited = citations(&table);
    assert!(cited.len() > 20, "too few citations parsed: {cited:?}");
    let mut missing = Vec::new();
    for citation in &cited {
        let (file, name) = match citation.split_once("::") {
            Some((file, name)) => (file, Some(name)),
            None => (citation.as_str(), None),
        };
        let Ok(source) = fs::read_to_string(root.join(file)) else {
            missing.push(format!("{citation}: no file {file}"));
            continue;
        };
        if let Some(name) = name
            && !source.contains(&format!("fn {name}("))
        {
            missing.push(format!("{citation}: no `fn {name}(` in {file}"));
        }
    }
    assert!(
        missing.is_empty(),
        "FAULTS.md cites missing tests:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_compile_fail_case_is_in_the_table() {
    let root = root();
    let table = fs::read_to_string(root.join("FAULTS.md")).expect("FAULTS.md at the root");
    let cited: BTreeSet<String> = citations(&table).into_iter().collect();
    let mut absent = Vec::new();
    for entry in fs::read_dir(root.join("tests/ui/fail")).expect("tests/ui/fail") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let citation = format!("tests/ui/fail/{name}");
            if !cited.contains(&citation) {
                absent.push(citation);
            }
        }
    }
    assert!(
        absent.is_empty(),
        "UI fail cases missing from FAULTS.md: {absent:?}"
    );
}
