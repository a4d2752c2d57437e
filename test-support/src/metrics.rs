//! Reading a process's Prometheus `/metrics` page.

use std::net::SocketAddr;

/// One scrape of a `/metrics` page.
#[derive(Debug, Clone)]
pub struct Scrape(pub String);

impl Scrape {
    /// The sum of the samples named `name` (every label set), or `None` when there is none. `name` may carry
    /// labels (`parley_writes_total{kind="apply"}`) to pick one series.
    pub fn value(&self, name: &str) -> Option<f64> {
        let samples: Vec<f64> = self
            .0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let matches = series == name || (!name.contains('{') && series.starts_with(&format!("{name}{{")));
                matches.then(|| value.trim().parse::<f64>().ok()).flatten()
            })
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }
}

/// Fetches `http://{address}/metrics`; the body only.
pub async fn scrape(address: SocketAddr) -> Scrape {
    Scrape(crate::http::request(address, "GET", "/metrics", None, "").await.body)
}

/// One metric of the process at `address` (summed over its label sets); panics when it is not exported.
pub async fn metric(address: SocketAddr, name: &str) -> f64 {
    let scrape = scrape(address).await;
    scrape.value(name).unwrap_or_else(|| panic!("metric {name} is not exported by {address}:\n{}", scrape.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_summed_over_label_sets_unless_one_is_named() {
        let page = Scrape(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{kind=\"x\"} 2\na_total{kind=\"y\"} 3\nab_total 7\n\
             b 1.5\n"
                .to_owned(),
        );
        assert_eq!(page.value("a_total"), Some(5.0));
        assert_eq!(page.value("a_total{kind=\"y\"}"), Some(3.0));
        assert_eq!(page.value("b"), Some(1.5));
        assert_eq!(page.value("c"), None);
    }
}
