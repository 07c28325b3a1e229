//! Who may call: service requests carry a policy SAS token (`skn` names the policy), device
//! requests a token signed with the device's key (or a policy with `DeviceConnect`). Parsing and
//! signature checks are dps-core's; this module decides audiences and rights.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dps_core::sas::SasToken;
use dps_core::secret::Secret;

use crate::error::MinihubError;
use crate::model::{AccessRight, AuthenticationType, Device, DeviceStatus, HubInfo, HubPolicy};

/// Clock difference tolerated on token expiry, as IoT Hub's own parser allows.
const EXPIRY_SKEW_SECS: i64 = 300;

fn unauthorized(reason: impl Into<String>) -> MinihubError {
    MinihubError::Unauthorized(reason.into())
}

/// Splits a decoded audience into its host (port removed, lower case) and the path after it.
fn split_audience(audience: &str) -> (String, &str) {
    let audience = audience
        .strip_prefix("https://")
        .or_else(|| audience.strip_prefix("http://"))
        .unwrap_or(audience);
    let (authority, path) = match audience.find('/') {
        Some(at) => audience.split_at(at),
        None => (audience, ""),
    };
    (crate::host_without_port(authority), path)
}

fn parse(token: &str, now: i64) -> Result<SasToken, MinihubError> {
    let token = SasToken::parse(token).map_err(|e| unauthorized(e.to_string()))?;
    token
        .check_expiry(now, EXPIRY_SKEW_SECS)
        .map_err(|e| unauthorized(e.to_string()))?;
    Ok(token)
}

fn verify_keys(token: &SasToken, keys: [&Secret; 2]) -> Result<(), MinihubError> {
    // A key that is not base64 can never have signed anything; it is skipped, not an error.
    let keys: Vec<Vec<u8>> = keys
        .iter()
        .filter_map(|k| B64.decode(k.expose().trim()).ok())
        .collect();
    token
        .verify_signature(keys.iter().map(Vec::as_slice))
        .map(|_| ())
        .map_err(|e| unauthorized(e.to_string()))
}

fn policy_for<'h>(hub: &'h HubInfo, token: &SasToken) -> Result<&'h HubPolicy, MinihubError> {
    let name = token
        .key_name
        .as_deref()
        .ok_or_else(|| unauthorized("the token names no shared access policy (skn)"))?;
    let policy = hub
        .policy(name)
        .ok_or_else(|| unauthorized(format!("no shared access policy named '{name}'")))?;
    verify_keys(token, [&policy.primary_key, &policy.secondary_key])?;
    Ok(policy)
}

fn require(policy: &HubPolicy, any_of: &[AccessRight]) -> Result<(), MinihubError> {
    if policy.grants_any(any_of) {
        return Ok(());
    }
    let wanted: Vec<String> = any_of.iter().map(|r| format!("{r:?}")).collect();
    Err(unauthorized(format!(
        "policy '{}' does not grant {}",
        policy.name,
        wanted.join(" or ")
    )))
}

/// Checks a service request's `Authorization` header: a token for this hub, signed with a policy
/// key, unexpired, from a policy granting one of `any_of`.
pub(crate) fn authorize_service(
    hub: &HubInfo,
    header: Option<&str>,
    any_of: &[AccessRight],
    now: i64,
) -> Result<(), MinihubError> {
    let header = header.ok_or_else(|| {
        unauthorized("the request has no Authorization header with a SharedAccessSignature")
    })?;
    let token = parse(header, now)?;
    let audience = token.audience();
    let (host, path) = split_audience(&audience);
    if host != hub.host_name || !path.trim_end_matches('/').is_empty() {
        return Err(unauthorized(
            dps_core::sas::SasError::WrongAudience(audience).to_string(),
        ));
    }
    let policy = policy_for(hub, &token)?;
    require(policy, any_of)
}

/// Checks that policy `key_name` has the key `key` (either of its two) and grants one of `any_of`.
pub(crate) fn authorize_policy(
    hub: &HubInfo,
    key_name: &str,
    key: &str,
    any_of: &[AccessRight],
) -> Result<(), MinihubError> {
    let policy = hub
        .policy(key_name)
        .ok_or_else(|| unauthorized(format!("no shared access policy named '{key_name}'")))?;
    let matches = |candidate: &Secret| {
        let (a, b) = (candidate.expose().trim().as_bytes(), key.trim().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    };
    if !matches(&policy.primary_key) && !matches(&policy.secondary_key) {
        return Err(unauthorized(format!(
            "the key is not a key of policy '{}'",
            policy.name
        )));
    }
    require(policy, any_of)
}

/// Checks a device's TLS client certificate against its `selfSigned` thumbprints.
pub(crate) fn authorize_certificate(
    device_id: &str,
    device: Option<&Device>,
    leaf: &[u8],
) -> Result<(), MinihubError> {
    let device =
        device.ok_or_else(|| unauthorized(format!("device '{device_id}' is not registered")))?;
    if device.authentication.kind != AuthenticationType::SelfSigned {
        return Err(unauthorized(format!(
            "device '{device_id}' does not authenticate with a self-signed X.509 thumbprint"
        )));
    }
    let sha256 = dps_core::certificate::sha256_thumbprint(leaf);
    let sha1 = dps_core::certificate::sha1_thumbprint(leaf);
    let thumbprints = &device.authentication.x509_thumbprint;
    let known = [
        &thumbprints.primary_thumbprint,
        &thumbprints.secondary_thumbprint,
    ]
    .into_iter()
    .flatten()
    .any(|t| t.eq_ignore_ascii_case(&sha256) || t.eq_ignore_ascii_case(&sha1));
    if !known {
        return Err(unauthorized(format!(
            "the certificate (SHA-256 {sha256}) is not a thumbprint of device '{device_id}'"
        )));
    }
    if device.status == DeviceStatus::Disabled {
        return Err(MinihubError::DeviceDisabled(device_id.to_owned()));
    }
    Ok(())
}

/// Checks a device token for `device_id` (`None` when no such device is registered): audience
/// `{hub}/devices/{id}`, signed with one of the device's keys, or with the key of a policy that
/// grants `DeviceConnect`. A disabled device is refused even with a good token.
pub(crate) fn authorize_device(
    hub: &HubInfo,
    device_id: &str,
    device: Option<&Device>,
    token: &str,
    now: i64,
) -> Result<(), MinihubError> {
    let token = parse(token, now)?;
    let audience = token.audience();
    let (host, path) = split_audience(&audience);
    let for_device = path.strip_prefix("/devices/") == Some(device_id);
    let hub_wide = path.trim_end_matches('/').is_empty() && token.key_name.is_some();
    if host != hub.host_name || !(for_device || hub_wide) {
        return Err(unauthorized(
            dps_core::sas::SasError::WrongAudience(audience).to_string(),
        ));
    }
    if token.key_name.is_some() {
        require(policy_for(hub, &token)?, &[AccessRight::DeviceConnect])?;
    }
    let device =
        device.ok_or_else(|| unauthorized(format!("device '{device_id}' is not registered")))?;
    if token.key_name.is_none() {
        let keys = &device.authentication.symmetric_key;
        let (Some(primary), Some(secondary), AuthenticationType::Sas) = (
            &keys.primary_key,
            &keys.secondary_key,
            device.authentication.kind,
        ) else {
            return Err(unauthorized(format!(
                "device '{device_id}' does not authenticate with symmetric keys"
            )));
        };
        verify_keys(&token, [primary, secondary])?;
    }
    if device.status == DeviceStatus::Disabled {
        return Err(MinihubError::DeviceDisabled(device_id.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use dps_core::sas::generate_token;

    use super::*;
    use crate::model::{AuthenticationMechanism, DeviceCapabilities, SymmetricKey, X509Thumbprint};

    const NOW: i64 = 1_800_000_000;

    fn hub() -> HubInfo {
        HubInfo {
            host_name: "hub-a.example".into(),
            policies: HubPolicy::defaults(),
        }
    }

    fn key(hub: &HubInfo, name: &str) -> String {
        hub.policy(name)
            .expect("policy")
            .primary_key
            .expose()
            .to_owned()
    }

    fn device(primary: &str) -> Device {
        Device {
            device_id: "dev 1".into(),
            generation_id: "1".into(),
            etag: "e".into(),
            connection_state: "Disconnected".into(),
            status: DeviceStatus::Enabled,
            status_reason: None,
            connection_state_updated_time: String::new(),
            status_updated_time: String::new(),
            last_activity_time: String::new(),
            cloud_to_device_message_count: 0,
            authentication: AuthenticationMechanism {
                symmetric_key: SymmetricKey {
                    primary_key: Some(Secret::new(primary)),
                    secondary_key: Some(Secret::new(dps_core::sas::generate_key())),
                },
                x509_thumbprint: X509Thumbprint::default(),
                kind: AuthenticationType::Sas,
            },
            capabilities: DeviceCapabilities::default(),
            device_scope: None,
            parent_scopes: Vec::new(),
        }
    }

    #[test]
    fn service_tokens() {
        let hub = hub();
        let owner = key(&hub, "iothubowner");
        let read = [AccessRight::RegistryRead];
        for sr in ["hub-a.example", "HUB-A.example:8443", "hub-a.example/"] {
            let token = generate_token(sr, &owner, Some("iothubowner"), NOW + 60).expect("token");
            assert!(
                authorize_service(&hub, Some(&token), &read, NOW).is_ok(),
                "{sr}"
            );
        }
        let cases = [
            generate_token("hub-b.example", &owner, Some("iothubowner"), NOW + 60),
            generate_token("hub-a.example", &owner, Some("iothubowner"), NOW - 3600),
            generate_token("hub-a.example", &owner, Some("service"), NOW + 60),
            generate_token("hub-a.example", &owner, None, NOW + 60),
            generate_token("hub-a.example", &owner, Some("nobody"), NOW + 60),
            generate_token(
                "hub-a.example/devices/x",
                &owner,
                Some("iothubowner"),
                NOW + 60,
            ),
        ];
        for token in cases {
            let token = token.expect("token");
            assert!(
                matches!(
                    authorize_service(&hub, Some(&token), &read, NOW),
                    Err(MinihubError::Unauthorized(_))
                ),
                "{token}"
            );
        }
        assert!(authorize_service(&hub, None, &read, NOW).is_err());
        let reader = generate_token(
            "hub-a.example",
            &key(&hub, "registryRead"),
            Some("registryRead"),
            NOW + 60,
        )
        .expect("token");
        assert!(authorize_service(&hub, Some(&reader), &read, NOW).is_ok());
        let err = authorize_service(&hub, Some(&reader), &[AccessRight::RegistryWrite], NOW)
            .expect_err("read-only");
        assert!(err.to_string().contains("RegistryWrite"), "{err}");
    }

    #[test]
    fn device_tokens() {
        let hub = hub();
        let device_key = dps_core::sas::generate_key();
        let mut dev = device(&device_key);
        let token = generate_token("hub-a.example/devices/dev 1", &device_key, None, NOW + 60)
            .expect("token");
        assert!(authorize_device(&hub, "dev 1", Some(&dev), &token, NOW).is_ok());
        assert!(authorize_device(&hub, "dev 2", Some(&dev), &token, NOW).is_err());
        assert!(authorize_device(&hub, "dev 1", None, &token, NOW).is_err());
        let wrong = generate_token(
            "hub-a.example/devices/dev 1",
            &dps_core::sas::generate_key(),
            None,
            NOW + 60,
        )
        .expect("token");
        assert!(matches!(
            authorize_device(&hub, "dev 1", Some(&dev), &wrong, NOW),
            Err(MinihubError::Unauthorized(_))
        ));
        let policy = generate_token(
            "hub-a.example",
            &key(&hub, "device"),
            Some("device"),
            NOW + 60,
        )
        .expect("token");
        assert!(authorize_device(&hub, "dev 1", Some(&dev), &policy, NOW).is_ok());
        let no_right = generate_token(
            "hub-a.example",
            &key(&hub, "registryRead"),
            Some("registryRead"),
            NOW + 60,
        )
        .expect("token");
        assert!(authorize_device(&hub, "dev 1", Some(&dev), &no_right, NOW).is_err());
        dev.status = DeviceStatus::Disabled;
        assert!(matches!(
            authorize_device(&hub, "dev 1", Some(&dev), &token, NOW),
            Err(MinihubError::DeviceDisabled(_))
        ));
    }
}
