//! Deadlines as gRPC carries them: the `grpc-timeout` request header.

use std::time::Duration;

/// The caller's remaining time budget, if it sent one. The header is digits followed by
/// a unit: H, M, S, m (milli), u (micro), n (nano).
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    parse(value)
}

/// The part of a caller's `timeout` a server spends before answering DEADLINE_EXCEEDED
/// itself: a margin short of it (5% of it, between 5 and 50 ms). At the deadline itself,
/// tonic's own timer — which wraps every service, outside any layer — would answer first,
/// with CANCELLED ("Timeout expired"), the wrong code for a passed deadline.
pub fn answer_within(timeout: Duration) -> Duration {
    let margin = (timeout / 20).clamp(Duration::from_millis(5), Duration::from_millis(50));
    if timeout > margin * 2 {
        timeout - margin
    } else {
        timeout / 2
    }
}

/// Parse one `grpc-timeout` value.
pub fn parse(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse() {
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("m"), None);
        assert_eq!(parse("1234567890S"), None);
    }

    #[test]
    fn a_server_answers_a_margin_before_the_deadline() {
        let ms = Duration::from_millis;
        assert_eq!(answer_within(ms(200)), ms(190));
        assert_eq!(answer_within(Duration::from_secs(30)), ms(29_950));
        assert_eq!(answer_within(ms(8)), ms(4));
    }
}
