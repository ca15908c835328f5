//! Client → server bytes: the login-phase frame reader with the password-message parsers, then the session's
//! forwarding scanner (Terminate stops it; requests and batches are counted), chunked by the first input byte.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgweir_fuzz::frontend_framing(data));
