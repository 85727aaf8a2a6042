//! Nothing here: the tests in `tests/` drive [`nsm_wireguard::Peer`] with boringtun's mocked clock.
#![forbid(unsafe_code)]
