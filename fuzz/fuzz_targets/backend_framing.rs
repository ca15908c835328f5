//! Server → client bytes: the session's forwarding scanner (ReadyForQuery and ParameterStatus inspected whole),
//! chunked by the first input byte, and every backend-login decoder on each complete frame.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgweir_fuzz::backend_framing(data));
