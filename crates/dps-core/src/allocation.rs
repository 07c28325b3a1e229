//! Allocation policies: which linked hub a device goes to. The policy only decides; the caller
//! writes to the hub.
//!
//! - `hashed`: weighted rendezvous hashing of the lower-cased registration id over the candidate
//!   hubs. Deterministic (a device re-registering lands on the same hub), proportional to
//!   `allocationWeight`, and adding a hub moves only the devices that now belong to it.
//! - `static`: the one hub named on the enrollment (in `iotHubs`, or the legacy `iotHubHostName`).
//!   An enrollment that names none, as Microsoft's own SDK tests create them, gets the linked hub
//!   that accepts allocation and comes first by host name: with one such hub, that hub; with several,
//!   the same one for every device until the set of linked hubs changes.
//! - `geoLatency`: self-hosted, the latency a device sees is the latency to the node it reached, so
//!   the candidates are the hubs whose `location` equals this node's region; hashed among them, and
//!   over all candidates when none is in the region.
//! - `custom`: decided by the enrollment's webhook (`crate::webhook`), not here.

use sha2::{Digest, Sha256};

use crate::linked_hub::LinkedHub;
use crate::model::AllocationPolicy;

/// Why no hub could be chosen. Each maps to a failed registration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// No linked hub is a candidate.
    #[error(
        "no linked IoT hub is available for this enrollment; link one with `opendps linked-hub create`, or serve one in-process with `opendps serve --hub NAME`"
    )]
    NoHubs,
    /// The enrollment names a hub that is not linked.
    #[error("the enrollment names IoT hub '{0}', which is not linked to this service")]
    UnknownHub(String),
    /// `custom` is decided by the enrollment's webhook (see `webhook`), never by [`allocate`].
    #[error("the custom allocation policy is decided by the enrollment's webhook")]
    CustomNeedsWebhook,
}

impl AllocationError {
    /// The DPS error code a failed registration carries.
    pub fn error_code(&self) -> u32 {
        match self {
            Self::CustomNeedsWebhook => 400_207,
            Self::NoHubs | Self::UnknownHub(_) => 400_211,
        }
    }
}

/// The candidate hubs of an enrollment: the hubs it names (each must be linked; see
/// [`crate::model::Enrollment::allocation`]), else every linked hub.
pub fn candidates<'h>(
    linked: &'h [LinkedHub],
    enrollment_hubs: Option<&[String]>,
) -> Result<Vec<&'h LinkedHub>, AllocationError> {
    match enrollment_hubs.filter(|h| !h.is_empty()) {
        Some(names) => names
            .iter()
            .map(|name| {
                linked
                    .iter()
                    .find(|hub| hub.host_name.eq_ignore_ascii_case(name))
                    .ok_or_else(|| AllocationError::UnknownHub(name.clone()))
            })
            .collect(),
        None => Ok(linked.iter().collect()),
    }
}

/// Chooses a hub for `registration_id` under `policy` (`custom` is the webhook's to decide).
pub fn allocate<'h>(
    policy: AllocationPolicy,
    registration_id: &str,
    candidates: &[&'h LinkedHub],
    region: Option<&str>,
) -> Result<&'h LinkedHub, AllocationError> {
    match policy {
        AllocationPolicy::Static => match candidates {
            [only] => Ok(only),
            several => several
                .iter()
                .copied()
                .filter(|hub| hub.apply_allocation_policy)
                .min_by_key(|hub| hub.host_name.to_ascii_lowercase())
                .ok_or(AllocationError::NoHubs),
        },
        AllocationPolicy::Hashed => hashed(registration_id, candidates),
        AllocationPolicy::GeoLatency => {
            let local: Vec<&LinkedHub> = candidates
                .iter()
                .copied()
                .filter(|hub| {
                    region.is_some_and(|r| {
                        hub.location
                            .as_deref()
                            .is_some_and(|l| l.eq_ignore_ascii_case(r))
                    })
                })
                .collect();
            hashed(
                registration_id,
                if local.iter().any(|h| h.apply_allocation_policy) {
                    &local
                } else {
                    candidates
                },
            )
        }
        AllocationPolicy::Custom => Err(AllocationError::CustomNeedsWebhook),
    }
}

/// Weighted rendezvous hashing over the hubs that accept allocation.
fn hashed<'h>(
    registration_id: &str,
    candidates: &[&'h LinkedHub],
) -> Result<&'h LinkedHub, AllocationError> {
    let id = registration_id.to_ascii_lowercase();
    candidates
        .iter()
        .copied()
        .filter(|hub| hub.apply_allocation_policy)
        .map(|hub| (score(&id, hub), hub))
        .max_by(|(a, _), (b, _)| a.total_cmp(b))
        .map(|(_, hub)| hub)
        .ok_or(AllocationError::NoHubs)
}

/// `weight / -ln(u)` with `u` uniform in (0, 1) from a hash of (device, hub): the hub with the highest
/// score wins, and each hub wins with probability proportional to its weight.
fn score(registration_id: &str, hub: &LinkedHub) -> f64 {
    let digest = Sha256::new()
        .chain_update(registration_id.as_bytes())
        .chain_update([0])
        .chain_update(hub.host_name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let u = (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    let u = u.clamp(f64::MIN_POSITIVE, 1.0 - f64::EPSILON);
    f64::from(hub.allocation_weight.max(1)) / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn hub(name: &str, weight: u32, apply: bool, location: Option<&str>) -> LinkedHub {
        LinkedHub {
            host_name: name.into(),
            connection_string: Secret::new(""),
            allocation_weight: weight,
            apply_allocation_policy: apply,
            location: location.map(Into::into),
            twins: true,
        }
    }

    #[test]
    fn hashed_honours_weights_and_is_deterministic() {
        let hubs = [hub("a", 1, true, None), hub("b", 3, true, None)];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let to_b = (0..8000)
            .filter(|i| {
                allocate(
                    AllocationPolicy::Hashed,
                    &format!("device-{i}"),
                    &refs,
                    None,
                )
                .map(|h| h.host_name.as_str())
                    == Ok("b")
            })
            .count();
        let share = to_b as f64 / 8000.0;
        assert!((0.72..0.78).contains(&share), "share of b = {share}");
        let first = allocate(AllocationPolicy::Hashed, "Device-7", &refs, None)
            .map(|h| h.host_name.clone());
        assert_eq!(
            first,
            allocate(AllocationPolicy::Hashed, "device-7", &refs, None)
                .map(|h| h.host_name.clone())
        );
    }

    #[test]
    fn hubs_that_refuse_allocation_get_nothing() {
        let hubs = [hub("a", 1, true, None), hub("off", 1000, false, None)];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        for i in 0..500 {
            assert_eq!(
                allocate(AllocationPolicy::Hashed, &format!("d{i}"), &refs, None)
                    .map(|h| h.host_name.as_str()),
                Ok("a")
            );
        }
        let off = [hub("off", 1, false, None)];
        assert_eq!(
            allocate(
                AllocationPolicy::Hashed,
                "d",
                &off.iter().collect::<Vec<_>>(),
                None
            ),
            Err(AllocationError::NoHubs)
        );
    }

    #[test]
    fn candidates_narrow_to_the_enrollment_hubs() {
        let hubs = [hub("a", 1, true, None), hub("b", 1, true, None)];
        let only_b = candidates(&hubs, Some(&["B".to_owned()])).expect("known");
        assert_eq!(only_b.len(), 1);
        assert_eq!(
            candidates(&hubs, Some(&["c".to_owned()])),
            Err(AllocationError::UnknownHub("c".into()))
        );
        assert_eq!(candidates(&hubs, Some(&[])).map(|c| c.len()), Ok(2));
        assert_eq!(
            allocate(AllocationPolicy::Static, "d", &only_b, None).map(|h| h.host_name.as_str()),
            Ok("b")
        );
    }

    #[test]
    fn static_without_a_named_hub_takes_the_first_hub_accepting_allocation() {
        let hubs = [
            hub("c", 1, true, None),
            hub("A", 1, false, None),
            hub("b", 1, true, None),
        ];
        let all: Vec<&LinkedHub> = hubs.iter().collect();
        for device in ["d1", "d2", "d3"] {
            assert_eq!(
                allocate(AllocationPolicy::Static, device, &all, None)
                    .map(|h| h.host_name.as_str()),
                Ok("b"),
                "the same hub for every device; 'A' refuses allocation"
            );
        }
        let refusing = [hub("a", 1, false, None), hub("z", 1, false, None)];
        let refusing: Vec<&LinkedHub> = refusing.iter().collect();
        assert_eq!(
            allocate(AllocationPolicy::Static, "d", &refusing, None),
            Err(AllocationError::NoHubs)
        );
    }

    #[test]
    fn geo_latency_prefers_the_local_region() {
        let hubs = [
            hub("west", 1, true, Some("westus")),
            hub("east", 1000, true, Some("eastus")),
        ];
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        for i in 0..200 {
            assert_eq!(
                allocate(
                    AllocationPolicy::GeoLatency,
                    &format!("d{i}"),
                    &refs,
                    Some("WestUS")
                )
                .map(|h| h.host_name.as_str()),
                Ok("west")
            );
        }
        let elsewhere = allocate(
            AllocationPolicy::GeoLatency,
            "d",
            &refs,
            Some("northeurope"),
        );
        assert!(elsewhere.is_ok(), "falls back to hashed over all hubs");
    }
}
