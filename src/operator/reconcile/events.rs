//! Events about the app: published by the apply and status stages and the
//! session watch; a failure to publish is logged, never fatal.
//!
//! kube's [`Recorder`](kube::runtime::events::Recorder) folds the events it
//! publishes into series by a key of (type, reason, action, reporter,
//! regarding object, related object) — not the note. A repeat of a key
//! within its cache's 6 minutes is sent as a PATCH of the first Event with
//! a higher `series.count`, carrying the first note: a second `Degraded`
//! event of the same reason with another message, or a second `Scaled`
//! event to another replica count, would show as a repeat of the first. So
//! every event's action carries a short hash of its note (see
//! [`series_action`]): distinct notes are distinct series, and the same
//! note again still folds into one.

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
    event.action = series_action(&event.action, event.note.as_deref());
    ctx.state.api_writes.inc();
    ctx.state.api_requests.inc();
    if let Err(e) = ctx.recorder.publish(&event, &app.object_ref(&())).await {
        tracing::warn!(error = %e, app = %app.name_any(), "publishing an event failed");
    }
}

/// The API server rejects an Event whose action is longer.
const EVENT_ACTION_MAX_BYTES: usize = 128;
/// Hex digits of the note's hash in the action: 32 bits, so two different
/// notes of one app, reason and type within the recorder's 6 minutes share
/// a series only by a 1 in 4 billion chance.
const NOTE_HASH_HEX_DIGITS: usize = 8;

/// `action` with a short hash of `note` (`Reconcile-1a2b3c4d`), so that the
/// recorder's series key (which ignores the note) tells notes apart. An
/// event without a note keeps its action.
fn series_action(action: &str, note: Option<&str>) -> String {
    let Some(note) = note else { return action.to_string() };
    let digest = ring::digest::digest(&ring::digest::SHA256, note.as_bytes());
    let hash: String = digest.as_ref()[..NOTE_HASH_HEX_DIGITS / 2].iter().map(|b| format!("{b:02x}")).collect();
    // Our actions are short words; cut one that is not, on a boundary, so
    // the hash always fits.
    let mut end = action.len().min(EVENT_ACTION_MAX_BYTES - NOTE_HASH_HEX_DIGITS - 1);
    while !action.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}-{hash}", &action[..end])
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

    /// The recorder's series key is (type, reason, action, reporter,
    /// regarding, related): with the reason, type and objects equal, the
    /// action alone must tell notes apart.
    #[test]
    fn different_notes_are_different_series_and_the_same_note_folds() {
        let scaled_to_5 = series_action("Scale", Some("Scaling session nodes from 3 to 5"));
        let scaled_to_2 = series_action("Scale", Some("Scaling session nodes from 5 to 2"));
        assert_ne!(scaled_to_5, scaled_to_2);
        assert_eq!(scaled_to_5, series_action("Scale", Some("Scaling session nodes from 3 to 5")));
        assert!(scaled_to_5.starts_with("Scale-") && scaled_to_5.len() == "Scale-".len() + NOTE_HASH_HEX_DIGITS);
        assert_eq!(series_action("Scale", None), "Scale");
    }

    #[test]
    fn the_action_with_its_hash_fits_what_the_api_server_accepts() {
        let long = "é".repeat(EVENT_ACTION_MAX_BYTES);
        let action = series_action(&long, Some("note"));
        assert!(action.len() <= EVENT_ACTION_MAX_BYTES, "{} bytes", action.len());
        assert_ne!(action, series_action(&long, Some("another note")), "the hash survives the cut");
    }
}
