// SPDX-License-Identifier: EUPL-1.2
//! Cancellation: a cheap, shareable flag with an optional deadline.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A cancellation signal for one or more calls.
///
/// Clones share one flag, so a caller keeps a clone and calls [`cancel`](Self::cancel) from any
/// thread while a backend polls [`is_cancelled`](Self::is_cancelled) between steps. A token can
/// carry a deadline, after which it reads as cancelled, and can have children: cancelling a parent
/// cancels its children, never the other way round.
///
/// ```
/// use inference_core::CancelToken;
/// let app = CancelToken::new();
/// let call = app.child();
/// call.cancel();
/// assert!(call.is_cancelled());
/// assert!(!app.is_cancelled());
/// app.cancel();
/// assert!(app.child().is_cancelled());
/// ```
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    deadline: Option<Instant>,
    parent: Option<CancelToken>,
}

impl CancelToken {
    /// A token that is not cancelled and has no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token that reads as cancelled from `deadline` on.
    pub fn with_deadline(deadline: Instant) -> Self {
        Self::from_inner(Some(deadline), None)
    }

    /// A token that reads as cancelled once `timeout` has passed from now. A timeout too large to
    /// represent means no deadline.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::from_inner(Instant::now().checked_add(timeout), None)
    }

    /// A new token that is cancelled when this one is, and can also be cancelled on its own.
    pub fn child(&self) -> Self {
        Self::from_inner(None, Some(self.clone()))
    }

    /// A child (see [`child`](Self::child)) that also reads as cancelled from `deadline` on.
    pub fn child_with_deadline(&self, deadline: Instant) -> Self {
        Self::from_inner(Some(deadline), Some(self.clone()))
    }

    /// A child (see [`child`](Self::child)) that also reads as cancelled once `timeout` has
    /// passed from now; typical for one request under a process-wide shutdown token.
    pub fn child_with_timeout(&self, timeout: Duration) -> Self {
        Self::from_inner(Instant::now().checked_add(timeout), Some(self.clone()))
    }

    fn from_inner(deadline: Option<Instant>, parent: Option<CancelToken>) -> Self {
        Self { inner: Arc::new(Inner { cancelled: AtomicBool::new(false), deadline, parent }) }
    }

    /// Cancels this token, its clones and its children. Idempotent.
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::Release);
    }

    /// Whether this token, or any parent, was cancelled or has passed its deadline.
    pub fn is_cancelled(&self) -> bool {
        let mut token = Some(self);
        let mut now = None;
        while let Some(t) = token {
            if t.inner.cancelled.load(Ordering::Acquire) {
                return true;
            }
            if let Some(deadline) = t.inner.deadline
                && *now.get_or_insert_with(Instant::now) >= deadline
            {
                return true;
            }
            token = t.inner.parent.as_ref();
        }
        false
    }

    /// `Err(Error::Cancelled)` when [`is_cancelled`](Self::is_cancelled), for use with `?`.
    ///
    /// # Errors
    ///
    /// [`Error::Cancelled`] when the token is cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() { Err(Error::Cancelled) } else { Ok(()) }
    }

    /// The earliest deadline of this token and its parents, if any.
    pub fn deadline(&self) -> Option<Instant> {
        let mut token = Some(self);
        let mut earliest: Option<Instant> = None;
        while let Some(t) = token {
            if let Some(d) = t.inner.deadline {
                earliest = Some(earliest.map_or(d, |e| e.min(d)));
            }
            token = t.inner.parent.as_ref();
        }
        earliest
    }
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .field("deadline", &self.deadline())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_token_is_not_cancelled_and_cancel_is_shared_by_clones() {
        let token = CancelToken::new();
        let clone = token.clone();
        assert!(!token.is_cancelled());
        assert!(token.check().is_ok());
        clone.cancel();
        clone.cancel();
        assert!(token.is_cancelled());
        assert!(matches!(token.check(), Err(Error::Cancelled)));
    }

    #[test]
    fn deadline_in_the_past_reads_as_cancelled() {
        let token = CancelToken::with_deadline(Instant::now());
        assert!(token.is_cancelled());
        assert!(token.child().is_cancelled());
    }

    #[test]
    fn far_deadline_and_huge_timeout_are_not_cancelled() {
        assert!(!CancelToken::with_timeout(Duration::from_secs(3600)).is_cancelled());
        let huge = CancelToken::with_timeout(Duration::MAX);
        assert!(!huge.is_cancelled());
        assert_eq!(huge.deadline(), None);
    }

    #[test]
    fn deadline_is_the_earliest_in_the_chain() {
        let now = Instant::now();
        let late = now + Duration::from_secs(100);
        let early = now + Duration::from_secs(10);
        let parent = CancelToken::with_deadline(early);
        assert_eq!(parent.child_with_deadline(late).deadline(), Some(early));
        assert_eq!(CancelToken::with_deadline(late).child_with_deadline(early).deadline(), Some(early));
        assert_eq!(CancelToken::new().child().deadline(), None);
        let shutdown = CancelToken::new();
        let request = shutdown.child_with_timeout(Duration::from_secs(3600));
        assert!(request.deadline().is_some());
        assert!(!request.is_cancelled());
        shutdown.cancel();
        assert!(request.is_cancelled());
        assert!(CancelToken::new().child_with_timeout(Duration::ZERO).is_cancelled());
    }

    #[test]
    fn child_cancel_does_not_reach_parent() {
        let parent = CancelToken::new();
        let child = parent.child();
        let grandchild = child.child();
        child.cancel();
        assert!(grandchild.is_cancelled());
        assert!(!parent.is_cancelled());
    }

    #[test]
    fn debug_shows_state() {
        let token = CancelToken::new();
        token.cancel();
        assert_eq!(format!("{token:?}"), "CancelToken { cancelled: true, deadline: None }");
    }
}
