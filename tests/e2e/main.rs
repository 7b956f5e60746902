//! The end-to-end tests on the real nodes (tests/bed/nodes), one test
//! binary (`cargo test --test e2e`): ClusterApps run by the operator, the
//! chart installed with helm, and Tomcat's own membership on Kubernetes.
//! Every test takes [`common::serial`] first — they share the nodes, and
//! one test's load or killed node must not land in another's figures — so
//! merging them into one binary changed nothing about what runs at once.

#[path = "../support/mod.rs"]
mod support;

#[path = "../operator/common/mod.rs"]
mod operator_common;

mod common;

mod chart_install;
mod membership;
mod nodes;
mod scale;
mod seed;
mod tribes_membership;
