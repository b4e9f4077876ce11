//! The Docker volume plugin protocol's JSON messages (docker/cli `docs/extend/plugins_volume.md`):
//! requests as Docker sends them, answers as it expects them. Field names are the protocol's.
//! Pure data: no behaviour beyond decoding leniency (a missing or `null` body is `{}`).

#![allow(non_snake_case)]

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `/VolumeDriver.Create`.
#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    pub Name: String,
    #[serde(default)]
    pub Opts: Option<HashMap<String, String>>,
}

/// `/VolumeDriver.Remove`, `.Path`, `.Get`.
#[derive(Debug, Deserialize)]
pub struct NameRequest {
    pub Name: String,
}

/// `/VolumeDriver.Mount`, `.Unmount`: `ID` names the caller (one per container mount).
#[derive(Debug, Deserialize)]
pub struct MountRequest {
    pub Name: String,
    #[serde(default)]
    pub ID: String,
}

/// Any failure: a non-empty `Err`.
#[derive(Debug, Default, Serialize)]
pub struct ErrResponse {
    pub Err: String,
}

#[derive(Debug, Default, Serialize)]
pub struct MountResponse {
    pub Mountpoint: String,
    pub Err: String,
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq)]
pub struct VolumeInfo {
    pub Name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub Mountpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub CreatedAt: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub Status: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Default, Serialize)]
pub struct GetResponse {
    pub Volume: Option<VolumeInfo>,
    pub Err: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ListResponse {
    pub Volumes: Vec<VolumeInfo>,
    pub Err: String,
}

#[derive(Debug, Serialize)]
pub struct Capabilities {
    pub Scope: String,
}

#[derive(Debug, Serialize)]
pub struct CapabilitiesResponse {
    pub Capabilities: Capabilities,
}

#[derive(Debug, Serialize)]
pub struct ActivateResponse {
    pub Implements: Vec<String>,
}

/// Decodes a request body; an empty or `null` body counts as `{}`.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let t = std::str::from_utf8(body).map_err(|_| "the request body is not UTF-8".to_string())?;
    let t = t.trim();
    let t = if t.is_empty() || t == "null" { "{}" } else { t };
    serde_json::from_str(t).map_err(|e| format!("malformed request JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_docker_requests_and_refuses_garbage() {
        let c: CreateRequest = decode(br#"{"Name":"v1","Opts":{"size":"1GiB"}}"#).expect("create");
        assert_eq!(c.Name, "v1");
        let c: CreateRequest = decode(br#"{"Name":"v1","Opts":null}"#).expect("null opts");
        assert!(c.Opts.is_none());
        let m: MountRequest = decode(br#"{"Name":"v1","ID":"abc"}"#).expect("mount");
        assert_eq!(m.ID, "abc");
        assert!(decode::<NameRequest>(b"{\"Name\":").is_err());
        assert!(decode::<NameRequest>(b"").is_err(), "Name is required");
        assert!(decode::<NameRequest>(&[0xff, 0xfe]).is_err());
    }
}
