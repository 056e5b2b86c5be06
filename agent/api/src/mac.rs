//! Ethernet addresses, spelled `aa:bb:cc:dd:ee:ff` on the wire and in state files. Shared by
//! the plugin, which reads them from netlink, and the agent, which writes them into the maps.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex bytes separated by ':')")]
pub struct ParseMacError(String);

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            // Two hex digits: from_str_radix alone also takes a sign ("+f").
            let part = parts
                .next()
                .filter(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(err)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_either_case_and_prints_lowercase() {
        let m: Mac = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.0, [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
    }

    #[test]
    fn rejects_malformed_addresses() {
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "2:ab:cd:00:01:ff",
            "zz:ab:cd:00:01:ff",
            "02-ab-cd-00-01-ff",
            // A sign is no hex digit (the api_decode fuzz target's MAC spelling invariant).
            "+2:ab:cd:00:01:ff",
            "02:ab:cd:00:01:+f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn travels_as_a_string() {
        let m = Mac([2, 0, 0, 0, 0, 1]);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:00:00:00:00:01\"");
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
    }
}
