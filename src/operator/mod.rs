//! `clusterapp operator`: turns each ClusterApp into a Tomcat cluster and
//! keeps it so. A typed pipeline per reconcile: read -> validate -> build
//! (pure) -> apply (server-side apply) -> status.

pub mod build;
pub mod names;
