//! clusterapp: a Kubernetes operator and an AJP load balancer for Tomcat
//! clusters with sticky, replicated HTTP sessions.
pub mod balancer;
pub mod crd;
pub mod operator;
pub mod telemetry;
