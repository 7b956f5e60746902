//! Events about the app: published by the apply and status stages; a
//! failure to publish is logged, never fatal.

use kube::Resource;
use kube::ResourceExt;
use kube::runtime::events::{Event, EventType};

use super::Context;
use crate::crd::ClusterApp;

/// The API server rejects an Event whose note is longer (events.k8s.io/v1).
const EVENT_NOTE_MAX_BYTES: usize = 1024;

/// Publishes an event about the app.
pub async fn publish(ctx: &Context, app: &ClusterApp, type_: EventType, reason: &str, action: &str, note: String) {
    let event =
        Event { type_, reason: reason.to_string(), note: Some(note), action: action.to_string(), secondary: None };
    publish_event(ctx, app, event).await;
}

pub async fn publish_event(ctx: &Context, app: &ClusterApp, mut event: Event) {
    event.note = event.note.map(event_note);
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    if let Err(e) = ctx.recorder.publish(&event, &app.object_ref(&())).await {
        tracing::warn!(error = %e, app = %app.name_any(), "publishing an event failed");
    }
}

/// `note` cut to what the API server accepts (a condition's message may be
/// longer, e.g. NodesCrashLooping quoting several pods): its start, which
/// names the first problem in full, and a mark that the status has the rest.
fn event_note(note: String) -> String {
    const CUT_MARK: &str = " … (cut; the ClusterApp's status has all)";
    if note.len() <= EVENT_NOTE_MAX_BYTES {
        return note;
    }
    let mut end = EVENT_NOTE_MAX_BYTES - CUT_MARK.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_notes_fit_what_the_api_server_accepts() {
        assert_eq!(event_note("short".to_string()), "short");
        let exact = "x".repeat(EVENT_NOTE_MAX_BYTES);
        assert_eq!(event_note(exact.clone()), exact);
        // Multi-byte characters across the limit: cut on a boundary.
        let long = format!("pod shop-1 restarted 3 times; its last lines:\n{}", "é".repeat(EVENT_NOTE_MAX_BYTES));
        let note = event_note(long.clone());
        assert!(note.len() <= EVENT_NOTE_MAX_BYTES, "{} bytes", note.len());
        assert!(note.starts_with("pod shop-1 restarted 3 times") && note.ends_with("the ClusterApp's status has all)"));
    }
}
