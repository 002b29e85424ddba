//! Identifier newtypes, so that an edge id cannot be passed where a group id
//! is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A fleet edge id; also the `--node-id` of the edge proxy serving it.
    EdgeId
);
id_type!(
    /// A fleet origin id.
    OriginId
);
id_type!(
    /// A client group id.
    GroupId
);
id_type!(
    /// A service id (short name, e.g. `www`).
    ServiceId
);

/// Version of a routing table. Only grows, also across restarts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ConfigVersion(pub u64);

impl ConfigVersion {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Checks that an id is usable: 1 to 63 characters of `[a-z0-9._-]`,
/// starting with a letter or digit.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("is empty".into());
    }
    if id.len() > 63 {
        return Err(format!("is {} characters long; at most 63", id.len()));
    }
    let first = id.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(format!(
            "{id:?} must start with a lowercase letter or a digit"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; use lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("ams1-a").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("Ams").is_err());
        assert!(check_id("-x").is_err());
        assert!(check_id("a b").is_err());
        assert!(check_id(&"a".repeat(64)).is_err());
    }

    #[test]
    fn versions_grow() {
        assert_eq!(ConfigVersion(7).next(), ConfigVersion(8));
    }
}
