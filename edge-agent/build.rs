//! Links the agent's steady-state code together.
//!
//! `steady-state.order` lists the functions that run while the agent classifies and escalates
//! inputs (recorded by `bench/record_code_order.sh`). lld places them first and next to each
//! other, so after `release_startup_code_s` gives start-up's code pages back, the pages inputs
//! bring back in are few and dense (docs/agent.md, "Memory"). A name that no longer exists is
//! skipped: a stale list costs memory, never correctness.
//!
//! Only for x86_64-unknown-linux-gnu, which Rust (1.90 and later) links with its own lld; the
//! cross targets link with Debian's GNU ld, which has no such option. `CASCADE_CODE_ORDER=0`
//! turns it off (for a linker other than lld, or to measure without it).

use std::path::Path;

fn main() {
    let order = Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("steady-state.order");
    // Watching a missing file would rerun this (and relink the agent) on every build; without
    // the list, watch the directory it would appear in.
    let watched = if order.exists() {
        order.clone()
    } else {
        order.parent().expect("a directory").to_owned()
    };
    println!("cargo:rerun-if-changed={}", watched.display());
    println!("cargo:rerun-if-env-changed=CASCADE_CODE_ORDER");
    let lld_target = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let enabled = std::env::var("CASCADE_CODE_ORDER").map_or(true, |v| v != "0");
    if lld_target && enabled && order.exists() {
        println!(
            "cargo:rustc-link-arg-bin=edge-agent=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=edge-agent=-Wl,--no-warn-symbol-ordering");
    }
}
