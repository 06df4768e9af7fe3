//! Three raftwork cores under hostile peers, driven by libFuzzer's input.
//! The harness and its checks are `raftwork_sim::hostile`; the property
//! test in crates/sim/tests/hostile.rs runs the same code in `cargo test`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    raftwork_sim::hostile::run(data);
});
