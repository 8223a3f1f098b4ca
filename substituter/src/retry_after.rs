//! `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date. Pure: the caller passes
//! the clock.
//!
//! S3-style object stores and CDNs in front of caches send the date form with 503s; the
//! breaker honours either (docs/binary-cache.md §5.1 rule 7). RFC 9110 §5.6.7 requires recipients to accept
//! all three date formats: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the obsolete RFC 850
//! form (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delay a `Retry-After` value asks for at `now`; a date in the past is zero.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = http_date(v)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

fn month(name: &str) -> Option<u32> {
    const M: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    M.iter().position(|m| *m == name).map(|i| i as u32 + 1)
}

fn hms(t: &str) -> Option<(u32, u32, u32)> {
    let mut it = t.split(':').map(|x| x.parse::<u32>().ok());
    let (h, m, s) = (it.next()??, it.next()??, it.next()??);
    (it.next().is_none() && h < 24 && m < 60 && s < 61).then_some((h, m, s))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of an HTTP-date in any of the three formats.
pub fn http_date(v: &str) -> Option<u64> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    let (y, mo, d, t) = match parts.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [_, d, mo, y, t, "GMT"] => (y.parse::<i64>().ok()?, month(mo)?, d.parse().ok()?, *t),
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT (two-digit years: RFC 9110 §5.6.7 says to
        // read one more than 50 years ahead as the past; 70–99 → 19xx is the usual reading).
        [_, dmy, t, "GMT"] => {
            let mut it = dmy.split('-');
            let (d, mo, y) = (it.next()?, it.next()?, it.next()?);
            let y: i64 = y.parse().ok()?;
            let y = match y {
                0..=69 => 2000 + y,
                70..=99 => 1900 + y,
                y => y,
            };
            (y, month(mo)?, d.parse().ok()?, *t)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_, mo, d, t, y] => (y.parse().ok()?, month(mo)?, d.parse().ok()?, *t),
        _ => return None,
    };
    // An HTTP-date's year has four digits (RFC 9110 §5.6.7); a longer one from a hostile
    // upstream would overflow the seconds below.
    if !(1..=31).contains(&d) || !(1..=9999).contains(&y) {
        return None;
    }
    let (h, mi, s) = hms(t)?;
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s);
    u64::try_from(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Sun, 06 Nov 1994 08:49:37 GMT (RFC 9110's example).
    const T: u64 = 784_111_777;

    /// Found by the `retry_after` fuzz target (ferry-fuzz/seeds/known-bugs): a 13-digit year
    /// overflowed the seconds (a panic in debug builds, a wrapped delay in release builds).
    #[test]
    fn a_year_of_more_than_four_digits_is_refused_not_overflowed() {
        assert_eq!(http_date("Sun, 06 Nov 1099511627776 08:49:37 GMT"), None);
        assert_eq!(http_date("Sun Nov  6 08:49:37 99999999999999"), None);
        assert_eq!(
            http_date("Sun, 06 Nov 9999 08:49:37 GMT").map(|s| s > T),
            Some(true)
        );
    }

    #[test]
    fn all_three_date_formats() {
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(T));
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(T));
        assert_eq!(http_date("Sun Nov  6 08:49:37 1994"), Some(T));
        assert_eq!(http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(1_835_481_599)
        );
        for bad in [
            "",
            "soon",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn delay_from_seconds_or_date() {
        let now = UNIX_EPOCH + Duration::from_secs(T - 90);
        assert_eq!(parse("120", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(90))
        );
        // A date already past asks for no wait at all.
        let later = UNIX_EPOCH + Duration::from_secs(T + 5);
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(parse("-5", now), None);
    }
}
