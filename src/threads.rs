//! The rayon pool for the fused elementwise passes, sized like libtorch's intra-op
//! pool so the two never ask for more cores than `torch.set_num_threads` allows.
//! The passes run between GEMMs, never beside them, so one size serves both.

use crate::error::{CeraError, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

/// Runs `work` inside the pool, rebuilding it when torch's thread count changed.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(current_pool()?.install(work))
}

fn current_pool() -> Result<Arc<ThreadPool>> {
    let wanted = tch::get_num_threads().max(1) as usize;
    let mut slot = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(pool) = slot.as_ref().filter(|p| p.current_num_threads() == wanted) {
        return Ok(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(wanted)
        .thread_name(|i| format!("cera-rs-{i}"))
        .build()
        .map_err(|e| CeraError::Runtime(format!("cannot start {wanted} worker threads: {e}")))?;
    let pool = Arc::new(pool);
    *slot = Some(Arc::clone(&pool));
    Ok(pool)
}
