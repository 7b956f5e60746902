//! The balancer's integration tests, one test binary (`cargo test --test
//! balancer`): the balancer binary against real Tomcat nodes (Debian's
//! `tomcat10` with the counter app), and against the real API server for
//! Kubernetes membership. One binary instead of one per file, because each
//! would link kube, hyper and rustls again; the tests of all files share
//! the `--test-threads` of one run.

#[path = "../support/mod.rs"]
mod support;

mod common;

mod admin;
mod health;
mod http_backend;
mod kubernetes;
mod malformed;
mod replication;
mod reuse;
mod roundtrip;
mod sessions;
mod tls;
