//! Validation of the identifiers a caller hands us: device ids, package
//! family names (PFNs) and DMClient provider ids.

use std::fmt;

/// Longest device id accepted, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Longest DMClient provider id accepted, in bytes.
pub const MAX_PROVIDER_ID_LEN: usize = 64;

/// Why an identifier was refused. The message is shown to API callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("device id is empty")]
    DeviceIdEmpty,
    #[error("device id is longer than {MAX_DEVICE_ID_LEN} bytes")]
    DeviceIdTooLong,
    #[error(
        "device id may only contain visible ASCII characters other than / ? # % \\ and quotes"
    )]
    DeviceIdChars,
    #[error("device id may not be only dots: '.' and '..' are path segments that clients and proxies rewrite")]
    DeviceIdDots,
    #[error("pfn must look like Name_publisherid: a 3-50 character name of letters, digits, '.' or '-', an underscore, and a 13 character lowercase publisher id")]
    Pfn,
    #[error("provider_id must be 1-64 characters of letters, digits, '.', '_' or '-'")]
    ProviderId,
}

/// A device identifier as the MDM server knows it (often a GUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates a device id: 1 to 128 bytes of visible ASCII, without the
    /// characters that would be ambiguous in a URL path segment or a log
    /// line, and not only dots (`.` and `..` are path segments that clients
    /// and proxies rewrite, so a request for them may reach another route).
    pub fn parse(s: &str) -> Result<DeviceId, IdError> {
        let id = DeviceId::parse_stored(s)?;
        if s.bytes().all(|b| b == b'.') {
            return Err(IdError::DeviceIdDots);
        }
        Ok(id)
    }

    /// Validates a device id read back from the store: as [`DeviceId::parse`],
    /// but ids of only dots, which earlier versions accepted, still load.
    pub fn parse_stored(s: &str) -> Result<DeviceId, IdError> {
        if s.is_empty() {
            return Err(IdError::DeviceIdEmpty);
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(IdError::DeviceIdTooLong);
        }
        let ok = s.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'%' | b'\\' | b'"' | b'\'')
        });
        if !ok {
            return Err(IdError::DeviceIdChars);
        }
        Ok(DeviceId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// A device id that was a [`DeviceId`] before (kept as text by the
    /// refresh queue): not checked again.
    pub(super) fn from_valid(s: String) -> DeviceId {
        DeviceId(s)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A package family name, e.g. `Contoso.MDM_8wekyb3d8bbwe`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pfn(String);

impl Pfn {
    /// Validates the shape of a PFN: `Name_PublisherId`, where the name is 3
    /// to 50 characters of `[A-Za-z0-9.-]` and the publisher id 13 characters
    /// of `[a-z0-9]`.
    pub fn parse(s: &str) -> Result<Pfn, IdError> {
        let (name, publisher) = s.rsplit_once('_').ok_or(IdError::Pfn)?;
        let name_ok = (3..=50).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        let publisher_ok = publisher.len() == 13
            && publisher
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
        if name_ok && publisher_ok {
            Ok(Pfn(s.to_owned()))
        } else {
            Err(IdError::Pfn)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// The DMClient provider id of the MDM server (the `{ProviderID}` node under
/// `./Vendor/MSFT/DMClient/Provider/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderId(String);

impl ProviderId {
    pub fn parse(s: &str) -> Result<ProviderId, IdError> {
        let ok = (1..=MAX_PROVIDER_ID_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(ProviderId(s.to_owned()))
        } else {
            Err(IdError::ProviderId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_ids_of_only_dots_are_refused_but_still_load() {
        for dots in [".", "..", "...."] {
            assert_eq!(DeviceId::parse(dots), Err(IdError::DeviceIdDots));
            assert_eq!(DeviceId::parse_stored(dots).unwrap().as_str(), dots);
        }
        for fine in ["a.", ".a", "..a..", "a..b"] {
            assert!(DeviceId::parse(fine).is_ok(), "{fine}");
        }
        assert_eq!(DeviceId::parse_stored(""), Err(IdError::DeviceIdEmpty));
        assert_eq!(DeviceId::parse_stored("a/b"), Err(IdError::DeviceIdChars));
    }

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11").is_ok());
        assert!(DeviceId::parse("{6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11}").is_ok());
        assert_eq!(DeviceId::parse(""), Err(IdError::DeviceIdEmpty));
        assert_eq!(
            DeviceId::parse(&"a".repeat(129)),
            Err(IdError::DeviceIdTooLong)
        );
        assert!(DeviceId::parse(&"a".repeat(128)).is_ok());
        for bad in ["a b", "a/b", "a?b", "a#b", "a%20", "tab\t", "ü"] {
            assert_eq!(DeviceId::parse(bad), Err(IdError::DeviceIdChars), "{bad:?}");
        }
    }

    #[test]
    fn pfns() {
        assert!(Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").is_ok());
        assert!(Pfn::parse("Microsoft.Windows.Shell_cw5n1h2txyewy").is_ok());
        for bad in [
            "",
            "Contoso.MDM",
            "Contoso.MDM_8WEKYB3D8BBWE",
            "Contoso.MDM_8wekyb3d8bbw",
            "C_8wekyb3d8bbwe",
            "Con toso_8wekyb3d8bbwe",
        ] {
            assert_eq!(Pfn::parse(bad), Err(IdError::Pfn), "{bad:?}");
        }
    }

    #[test]
    fn provider_ids() {
        assert!(ProviderId::parse("Contoso-MDM.1").is_ok());
        assert!(ProviderId::parse("").is_err());
        assert!(ProviderId::parse("a/b").is_err());
        assert!(ProviderId::parse(&"p".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn accepted_device_ids_are_url_path_safe(s in "\\PC{0,140}") {
            if let Ok(id) = DeviceId::parse(&s) {
                prop_assert!(!id.as_str().is_empty() && id.as_str().len() <= MAX_DEVICE_ID_LEN);
                prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'%'));
            }
        }
    }
}
