//! Metrics of a [`crate::ServerTls`], registered in a registry passed in.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `sextant_tls_cert_expiry_seconds`, `sextant_tls_reloads_total` and
/// `sextant_tls_reload_failures_total`. Attach with
/// [`crate::ServerTls::set_metrics`].
#[derive(Debug, Clone, Default)]
pub struct TlsMetrics {
    pub(crate) cert_expiry: Gauge,
    pub(crate) reloads: Counter,
    pub(crate) reload_failures: Counter,
}

impl TlsMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = TlsMetrics::default();
        registry.register(
            "sextant_tls_cert_expiry_seconds",
            "Not-after time of the serving TLS certificate, Unix seconds",
            m.cert_expiry.clone(),
        );
        registry.register(
            "sextant_tls_reloads",
            "TLS file sets loaded after a change on disk",
            m.reloads.clone(),
        );
        registry.register(
            "sextant_tls_reload_failures",
            "TLS file sets refused (unparsable, key not matching, bad CA); the previous one stays",
            m.reload_failures.clone(),
        );
        m
    }
}
