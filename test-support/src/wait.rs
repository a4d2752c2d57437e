//! Waiting on a condition instead of sleeping for a guessed time.

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`; panics naming `what` after that.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_until_the_condition_holds() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let value = eventually("the third call", Duration::from_secs(10), || {
            calls += 1;
            let call = calls;
            async move { (call == 3).then_some(call) }
        })
        .await;
        assert_eq!(value, 3);
        assert_eq!(started.elapsed(), Duration::from_millis(100), "two 50 ms intervals");
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for nothing")]
    async fn gives_up_at_the_deadline() {
        eventually::<(), _, _>("nothing", Duration::from_secs(1), || async { None }).await;
    }
}
