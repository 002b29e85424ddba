//! Country and ASN data for client groups that name countries or ASNs.
//!
//! A geo map is a text file of `prefix,country,asn` lines (country and ASN
//! may be empty; `#` starts a comment), e.g. exported from a GeoIP or BGP
//! database. When a config arrives, every prefix of the map whose ASN or
//! country a group names is put in the same longest-prefix tables as the
//! groups' own prefixes (ASN before country; a group's explicit prefix wins
//! over an identical map prefix), so a query never consults the map itself.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

/// One prefix of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeoEntry {
    pub net: IpNet,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: Option<String>,
    pub asn: Option<u32>,
}

/// A loaded geo map.
#[derive(Debug, Clone, Default)]
pub struct GeoMap {
    entries: Vec<GeoEntry>,
}

/// Why a geo map cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot read the geo map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

impl GeoMap {
    pub fn entries(&self) -> &[GeoEntry] {
        &self.entries
    }

    pub fn load(path: &Path) -> Result<Self, GeoError> {
        let text = std::fs::read_to_string(path).map_err(|source| GeoError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| GeoError::Line {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parses the text form; errors name the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != 3 {
                return Err((i + 1, format!("expected prefix,country,asn, got {line:?}")));
            }
            let net: IpNet = fields[0]
                .parse()
                .map_err(|_| (i + 1, format!("{:?} is not a CIDR prefix", fields[0])))?;
            if net.trunc() != net {
                return Err((i + 1, format!("{net} has host bits set")));
            }
            let country = match fields[1] {
                "" => None,
                c if c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
                    Some(c.to_ascii_uppercase())
                }
                c => return Err((i + 1, format!("{c:?} is not a two-letter country code"))),
            };
            let asn = match fields[2].trim_start_matches("AS") {
                "" => None,
                a => Some(
                    a.parse()
                        .map_err(|_| (i + 1, format!("{a:?} is not an AS number")))?,
                ),
            };
            entries.push(GeoEntry { net, country, asn });
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_lines() {
        let m = GeoMap::parse("# test\n192.0.2.0/24,nl,64501\n2001:db8::/32,,AS64502\n")
            .expect("parse");
        assert_eq!(m.entries().len(), 2);
        assert_eq!(m.entries()[0].country.as_deref(), Some("NL"));
        assert_eq!(m.entries()[1].asn, Some(64502));
        let e = GeoMap::parse("192.0.2.0/24,NL,1\n192.0.2.1/24,NL,1\n").expect_err("bad");
        assert_eq!(e.0, 2);
    }
}
