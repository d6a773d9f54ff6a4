//! The HTTP/1 proxy codec: one parser (httparse for heads, `body.rs` for framing) on the
//! client side and the backend side, heads rewritten while copied, bodies forwarded as they
//! are validated, backend connections pooled and driven by the request's own task.
pub mod body;
mod bridge;
pub mod buf;
pub mod conn;
mod exchange;
pub mod head;
pub mod pool;
pub mod response;
mod tunnel;
pub mod write;

pub use conn::{ClientIo, serve};
