//! The test bed itself, one test binary (`cargo test --test testbed`): the
//! local control plane is a real Kubernetes with the parts the rest of the
//! suite relies on (`cluster`), and the test bed's scripts behave as a user
//! meets them (`scripts`, each test with its own state folder).

#[path = "../support/mod.rs"]
mod support;

mod cluster;
mod scripts;
