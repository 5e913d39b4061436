//! Helpers live in tests/tests/common; this crate has only integration tests.
