//! [`Secret`]: a value that is kept, used, and never shown.

use serde::{Serialize, Serializer};

/// Wraps a secret (the bearer token). `Debug` and `Serialize` print only
/// `<redacted, N bytes>`; the value itself is reachable through
/// [`Secret::expose`] alone, so it cannot end up in logs or in
/// `check-config` output by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T: AsRef<[u8]>> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// Its length in bytes (safe to show).
    pub fn len(&self) -> usize {
        self.0.as_ref().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `<redacted, N bytes>`.
    pub fn redacted(&self) -> String {
        format!("<redacted, {} bytes>", self.len())
    }
}

impl<T: AsRef<[u8]>> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<T: AsRef<[u8]>> Serialize for Secret<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shows_the_value() {
        let s = Secret::new(String::from("hunter2"));
        assert_eq!(format!("{s:?}"), "<redacted, 7 bytes>");
        assert_eq!(
            format!("{:#?}", Some(&s)),
            "Some(\n    <redacted, 7 bytes>,\n)"
        );
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#""<redacted, 7 bytes>""#
        );
        assert_eq!(s.expose(), "hunter2");
    }
}
