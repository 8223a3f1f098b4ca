//! UTC calendar dates from Unix time, for logs, status tables and protocol headers
//! (`x-amz-date`), without a date crate.

/// `(year, month, day, hour, minute, second)` in UTC of `secs` seconds after 1970-01-01.
/// Proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
pub fn utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(mo <= 2);
    let rem = rem as u32;
    (y, mo, d, rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn known_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        // 2000-02-29 12:34:56 UTC, a leap day.
        assert_eq!(utc(951_827_696), (2000, 2, 29, 12, 34, 56));
        // 2026-11-22 00:00:00 UTC.
        assert_eq!(utc(1_795_305_600), (2026, 11, 22, 0, 0, 0));
    }
}
