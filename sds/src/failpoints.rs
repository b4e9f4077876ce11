//! The registry of this crate's fail points (`fail` crate). They compile to nothing unless the
//! `failpoints` feature is on; names follow `sds::module::before_action`.

/// Before a chunk's meta page is written (its data write runs in parallel).
pub const CHUNK_STORE_BEFORE_META_WRITE: &str = "sds::chunk_store::before_meta_write";
/// Before the primary forwards a write to the secondary.
pub const SERVICE_BEFORE_FORWARD: &str = "sds::service::before_forward";

/// Evaluate the fail point `name` (a no-op without the `failpoints` feature).
#[inline]
pub fn fail_point(name: &str) {
    let _ = name;
    fail::fail_point!(name);
}
