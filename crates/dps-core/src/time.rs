//! UTC timestamps in the shape DPS emits them: ISO-8601 with seven fractional digits and a `Z`.

use jiff::Timestamp;

/// Formats `ts` as DPS does, for example `2022-08-31T22:02:50.5163352Z`.
pub fn format_utc(ts: Timestamp) -> String {
    let seconds = ts.strftime("%Y-%m-%dT%H:%M:%S");
    let ticks = ts.subsec_nanosecond() / 100;
    format!("{seconds}.{ticks:07}Z")
}

/// A moment the service recorded, kept as a time, stored and sent in the DPS shape
/// ([`format_utc`]); any RFC 3339 text reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime(pub Timestamp);

impl serde::Serialize for UtcTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_utc(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for UtcTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse()
            .map(Self)
            .map_err(|e| serde::de::Error::custom(format!("'{text}' is not a UTC time: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_time_round_trips_in_the_dps_shape() {
        let ts: Timestamp = "2022-08-31T22:02:50.5163352Z".parse().expect("valid");
        let json = serde_json::to_string(&UtcTime(ts)).expect("json");
        assert_eq!(json, "\"2022-08-31T22:02:50.5163352Z\"");
        let back: UtcTime = serde_json::from_str(&json).expect("reads");
        assert_eq!(back, UtcTime(ts));
        assert!(serde_json::from_str::<UtcTime>("\"yesterday\"").is_err());
    }

    #[test]
    fn seven_fractional_digits() {
        let ts: Timestamp = "2022-08-31T22:02:50.516335212Z"
            .parse()
            .expect("valid timestamp");
        assert_eq!(format_utc(ts), "2022-08-31T22:02:50.5163352Z");
        let whole: Timestamp = "2022-08-31T22:02:50Z".parse().expect("valid timestamp");
        assert_eq!(format_utc(whole), "2022-08-31T22:02:50.0000000Z");
    }
}
