#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nsm_wireguard::wire::parse(data);
    let _ = nsm_wireguard::fuzz_datagram(data);
});
