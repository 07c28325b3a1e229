//! IoT hubs linked to the service, added by their connection strings.

use serde::{Deserialize, Serialize};

use crate::error::ProvisioningError;
use crate::secret::Secret;

/// The parts of `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName`.
    pub host_name: String,
    /// `SharedAccessKeyName`.
    pub key_name: String,
    /// `SharedAccessKey`, base64.
    pub key: Secret,
}

impl ConnectionString {
    /// Parses a connection string; field names are case-insensitive, values may contain `=`.
    pub fn parse(text: &str) -> Result<Self, ProvisioningError> {
        let (mut host, mut name, mut key) = (None, None, None);
        for part in text.trim().split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                ProvisioningError::InvalidArgument(format!(
                    "the connection string part '{}' has no '='; expected HostName=…;SharedAccessKeyName=…;SharedAccessKey=…",
                    k_only(part)
                ))
            })?;
            match k.trim().to_ascii_lowercase().as_str() {
                "hostname" => host = Some(v.trim().to_owned()),
                "sharedaccesskeyname" => name = Some(v.trim().to_owned()),
                "sharedaccesskey" => key = Some(Secret::new(v.trim())),
                _ => {}
            }
        }
        let missing = |field: &str| {
            ProvisioningError::InvalidArgument(format!(
                "the connection string has no {field}; expected HostName=…;SharedAccessKeyName=…;SharedAccessKey=…"
            ))
        };
        let host_name = host
            .filter(|h| !h.is_empty())
            .ok_or_else(|| missing("HostName"))?;
        let key_name = name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| missing("SharedAccessKeyName"))?;
        let key = key.ok_or_else(|| missing("SharedAccessKey"))?;
        if crate::sas::decode_key(key.expose()).is_none() {
            return Err(ProvisioningError::InvalidArgument(
                "the connection string's SharedAccessKey is not a base64 key of 16 to 64 bytes"
                    .into(),
            ));
        }
        Ok(Self {
            host_name,
            key_name,
            key,
        })
    }
}

fn k_only(part: &str) -> String {
    part.chars().take(20).collect()
}

/// A linked hub as stored; the connection string is a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkedHub {
    /// The hub's host name, for example `contoso-toasters-hub-1098.azure-devices.net`.
    pub host_name: String,
    /// The connection string DPS uses to write to the hub.
    pub connection_string: Secret,
    /// Weight in hashed allocation, 1 to 1000.
    pub allocation_weight: u32,
    /// Whether allocation policies may pick this hub.
    pub apply_allocation_policy: bool,
    /// An optional region label, used by `geoLatency`.
    pub location: Option<String>,
    /// Whether the hub keeps device twins: false for an IoT Hub of the Basic tier, as found when
    /// it was linked.
    #[serde(default = "twins_by_default")]
    pub twins: bool,
}

fn twins_by_default() -> bool {
    true
}

/// The request to link a hub (an opendps extension of the service API; Azure does this through ARM).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubRequest {
    /// The hub's connection string, with a policy that grants RegistryWrite and ServiceConnect.
    pub connection_string: String,
    /// Weight in hashed allocation, 1 to 1000 (default 1).
    #[serde(default)]
    pub allocation_weight: Option<u32>,
    /// Whether allocation policies may pick this hub (default true).
    #[serde(default)]
    pub apply_allocation_policy: Option<bool>,
    /// Optional region label.
    #[serde(default)]
    pub location: Option<String>,
}

/// A linked hub as the API shows it: never its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkedHubDescription {
    /// Host name.
    pub name: String,
    /// Weight in hashed allocation.
    pub allocation_weight: u32,
    /// Whether allocation policies may pick it.
    pub apply_allocation_policy: bool,
    /// Region label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The name of the hub policy DPS uses (the key itself is never shown).
    pub shared_access_key_name: String,
}

impl LinkedHub {
    /// Builds a linked hub from an API request, validating it.
    pub fn from_request(req: LinkedHubRequest) -> Result<Self, ProvisioningError> {
        let parsed = ConnectionString::parse(&req.connection_string)?;
        let allocation_weight = req.allocation_weight.unwrap_or(1);
        if !(1..=1000).contains(&allocation_weight) {
            return Err(ProvisioningError::InvalidArgument(format!(
                "allocationWeight must be between 1 and 1000, not {allocation_weight}"
            )));
        }
        Ok(Self {
            host_name: parsed.host_name.to_ascii_lowercase(),
            connection_string: Secret::new(req.connection_string.trim()),
            allocation_weight,
            apply_allocation_policy: req.apply_allocation_policy.unwrap_or(true),
            location: req.location.filter(|l| !l.is_empty()),
            twins: true,
        })
    }

    /// The API view.
    pub fn describe(&self) -> LinkedHubDescription {
        let key_name = ConnectionString::parse(self.connection_string.expose())
            .map(|c| c.key_name)
            .unwrap_or_default();
        LinkedHubDescription {
            name: self.host_name.clone(),
            allocation_weight: self.allocation_weight,
            apply_allocation_policy: self.apply_allocation_policy,
            location: self.location.clone(),
            shared_access_key_name: key_name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "HostName=Contoso-Toasters-Hub-1.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn parses_and_lowercases_host() {
        let hub = LinkedHub::from_request(LinkedHubRequest {
            connection_string: CS.into(),
            allocation_weight: Some(3),
            apply_allocation_policy: None,
            location: None,
        })
        .expect("valid");
        assert_eq!(hub.host_name, "contoso-toasters-hub-1.azure-devices.net");
        assert!(hub.apply_allocation_policy);
        assert_eq!(hub.describe().shared_access_key_name, "iothubowner");
        assert!(
            !serde_json::to_string(&hub.describe())
                .expect("json")
                .contains("AAAA")
        );
    }

    #[test]
    fn refuses_bad_input() {
        let req = |cs: &str, w: Option<u32>| LinkedHubRequest {
            connection_string: cs.into(),
            allocation_weight: w,
            apply_allocation_policy: None,
            location: None,
        };
        assert!(LinkedHub::from_request(req(CS, Some(0))).is_err());
        assert!(LinkedHub::from_request(req(CS, Some(1001))).is_err());
        assert!(LinkedHub::from_request(req("HostName=h;SharedAccessKeyName=n", None)).is_err());
        assert!(LinkedHub::from_request(req("garbage", None)).is_err());
        assert!(
            LinkedHub::from_request(req(
                "HostName=h;SharedAccessKeyName=n;SharedAccessKey=short",
                None
            ))
            .is_err()
        );
    }
}
