//! The cost of the default set per request. Run optimised:
//! `cargo test -p nsm-policy --release --test cost -- --ignored --nocapture`

mod common;

use std::time::Instant;

use common::Mesh;
use nsm_policy::PolicySet;

const N: u32 = 10_000;

#[test]
#[ignore = "measurement, not a test: run with --release --ignored --nocapture"]
fn default_set_cost_per_request() {
    let mesh = Mesh::new();
    let segments = mesh.segments();
    let set = PolicySet::server_defaults();
    let input = mesh.input(&segments);
    set.check(&input).unwrap();

    let start = Instant::now();
    for _ in 0..N {
        set.check(&input).unwrap();
    }
    let check = start.elapsed() / N;

    let start = Instant::now();
    for _ in 0..N {
        set.check(&mesh.input(&segments)).unwrap();
    }
    let whole = start.elapsed() / N;

    let start = Instant::now();
    for _ in 0..N {
        nsm_policy::verify(&segments[1].2, &mesh.nsmgr.cert_der).unwrap();
    }
    let verify = start.elapsed() / N;

    let start = Instant::now();
    for _ in 0..N {
        nsm_policy::decode(&segments[1].2).unwrap();
    }
    let decode = start.elapsed() / N;
    println!(
        "verify {:.1} µs, decode {:.1} µs",
        verify.as_secs_f64() * 1e6,
        decode.as_secs_f64() * 1e6
    );

    println!(
        "3-hop path, {N} iterations: check (4 default policies) {:.1} µs; path_input (decode 3 tokens, verify 1 ES256) + check {:.1} µs",
        check.as_secs_f64() * 1e6,
        whole.as_secs_f64() * 1e6
    );
}
