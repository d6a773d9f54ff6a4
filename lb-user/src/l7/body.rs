//! Streaming bodies between client and backend, with the bookkeeping that rides on them: the
//! request body's size limit and fault, the backend's in-flight count and the client
//! connection's activity, released when the response body ends or is dropped.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::watch;

use super::error::BoxError;
use crate::upstream::InFlight;

/// What went wrong on the client's side of a forwarded request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None = 0,
    /// Unreadable (bad chunk size, truncated, reset).
    Broken = 1,
    TooLarge = 2,
}

/// Shared between the body sent to the backend and the handler that classifies the outcome.
#[derive(Debug, Clone, Default)]
pub struct FaultFlag(Arc<AtomicU8>);

impl FaultFlag {
    pub fn get(&self) -> Fault {
        match self.0.load(Ordering::Relaxed) {
            1 => Fault::Broken,
            2 => Fault::TooLarge,
            _ => Fault::None,
        }
    }
    fn set(&self, f: Fault) {
        self.0.store(f as u8, Ordering::Relaxed);
    }
}

/// The client's request body on its way to the backend, cut off past `limit` bytes.
#[derive(Debug)]
pub struct RequestBody {
    /// A body read whole before sending (HTTP/1 clients of HTTP/2 backends).
    full: Option<Bytes>,
    inner: Option<Incoming>,
    seen: u64,
    limit: u64,
    fault: FaultFlag,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, fault: FaultFlag) -> Self {
        Self { full: None, inner: Some(inner), seen: 0, limit, fault }
    }

    pub fn empty() -> Self {
        Self { full: None, inner: None, seen: 0, limit: 0, fault: FaultFlag::default() }
    }

    pub fn full(bytes: Bytes) -> Self {
        let full = (!bytes.is_empty()).then_some(bytes);
        Self { full, inner: None, seen: 0, limit: 0, fault: FaultFlag::default() }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(b) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.fault.set(Fault::TooLarge);
                        this.inner = None;
                        return Poll::Ready(Some(Err("request body too large".into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.fault.set(Fault::Broken);
                this.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(b) = &self.full {
            return SizeHint::with_exact(b.len() as u64);
        }
        self.inner.as_ref().map(Body::size_hint).unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// Counts one request in progress on a client connection (see `server.rs`'s idle timer).
#[derive(Debug)]
pub struct Active(watch::Sender<usize>);

impl Active {
    pub fn new(counter: &watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[derive(Debug)]
enum Inner {
    Full(Option<Bytes>),
    Upstream(Incoming),
}

/// A response body to the client: a short proxy-made one or the backend's, streamed.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Inner,
    in_flight: Option<InFlight>,
    active: Option<Active>,
}

impl ResponseBody {
    pub fn full(bytes: Bytes) -> Self {
        Self { inner: Inner::Full(Some(bytes)), in_flight: None, active: None }
    }

    pub fn upstream(body: Incoming, in_flight: InFlight) -> Self {
        Self { inner: Inner::Upstream(body), in_flight: Some(in_flight), active: None }
    }

    /// Keeps the connection counted as active until this body is done.
    pub fn hold(&mut self, active: Active) {
        self.active = Some(active);
    }

    fn finish(&mut self) {
        self.in_flight = None;
        self.active = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        };
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(b) => b.size_hint(),
        }
    }
}
