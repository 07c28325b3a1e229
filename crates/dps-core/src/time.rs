//! UTC timestamps in the shape DPS emits them: ISO-8601 with seven fractional digits and a `Z`.

use jiff::Timestamp;

/// Formats `ts` as DPS does, for example `2022-08-31T22:02:50.5163352Z`.
pub fn format_utc(ts: Timestamp) -> String {
    let seconds = ts.strftime("%Y-%m-%dT%H:%M:%S");
    let ticks = ts.subsec_nanosecond() / 100;
    format!("{seconds}.{ticks:07}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

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
