//! HTTP/2 backends: one multiplexed connection per backend (hyper's HTTP/2 client, its
//! connection task spawned once per connection), so a request's `:authority` is the client's
//! while the connection goes to the backend the balancer picked.
use std::{net::SocketAddr, sync::Mutex, time::Duration};

use hyper::{Request, Response, body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thiserror::Error;

use super::{
    body::RequestBody,
    h1::pool::{self, Tls},
};

#[derive(Debug, Error)]
pub enum SendError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// The connections of one group's HTTP/2 backends.
pub struct H2Pool {
    conns: Mutex<Vec<(SocketAddr, http2::SendRequest<RequestBody>)>>,
    connect_timeout: Duration,
    tls: Option<Tls>,
}

impl H2Pool {
    pub fn new(connect_timeout: Duration, tls: Option<Tls>) -> Self {
        Self { conns: Mutex::new(Vec::new()), connect_timeout, tls }
    }

    /// Sends `req` to `addr` over its connection, opening one when there is none (or it ended).
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut sender = match self.live(addr) {
            Some(s) => s,
            None => self.open(addr).await?,
        };
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    fn live(&self, addr: SocketAddr) -> Option<http2::SendRequest<RequestBody>> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|(_, s)| !s.is_closed());
        conns.iter().find(|(a, _)| *a == addr).map(|(_, s)| s.clone())
    }

    async fn open(&self, addr: SocketAddr) -> Result<http2::SendRequest<RequestBody>, SendError> {
        let io = pool::connect(addr, self.connect_timeout, self.tls.as_ref())
            .await
            .map_err(SendError::Connect)?;
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let (sender, conn) = builder.handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("HTTP/2 connection to {addr} ended: {e}");
            }
        });
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.push((addr, sender.clone()));
        Ok(sender)
    }
}
