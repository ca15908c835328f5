//! Startup-phase packet bodies (everything after the length) through `parse_packet`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| pgweir_fuzz::startup_packet(data));
