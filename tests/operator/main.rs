//! The operator's integration tests, one test binary (`cargo test --test
//! operator`): the operator in-process against the real API server and
//! controller manager, each test in its own namespace with an operator that
//! watches only it, so the tests of all files may run at once.

#[path = "../support/mod.rs"]
mod support;

mod common;

mod api_docs;
mod crd;
mod leader;
mod reconcile;
