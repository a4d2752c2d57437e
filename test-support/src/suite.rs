//! One behaviour suite run against several drivers: [`engine_suite!`](crate::engine_suite).

/// Runs each test body once per driver. Every body is an `async fn name(engine: Engine)` of the calling file, which
/// also has an `enum Engine`; for each body the macro makes a module `name` with one multi-threaded tokio test per
/// driver, named as given (`name::embedded`, `name::redis`, ...):
///
/// ```
/// #[derive(Debug, Clone, Copy)]
/// enum Engine {
///     Embedded,
///     Cassandra,
/// }
///
/// async fn history_pages(engine: Engine) {
///     // `let Some(store) = ... else { return };` for an engine that is not there, then the checks.
///     let _ = engine;
/// }
///
/// async fn retention(_engine: Engine) {}
///
/// // Tests `history_pages::embedded`, `history_pages::cassandra`, `retention::embedded`, `retention::cassandra`.
/// parley_test_support::engine_suite!([embedded => Embedded, cassandra => Cassandra]; history_pages, retention);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! engine_suite {
    ($engines:tt; $($name:ident),* $(,)?) => {
        $($crate::engine_suite!(@one $name $engines);)*
    };
    (@one $name:ident [$($test:ident => $engine:ident),+ $(,)?]) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$name(super::Engine::$engine).await
                }
            )+
        }
    };
}
