//! `strftime_now(fmt)` for chat templates (Llama 3 and Granite print today's date into the
//! system prompt). transformers calls Python's `datetime.now().strftime(fmt)`; we format the
//! current UTC time ourselves, because servers run in UTC and pulling in a date crate for a
//! dozen format codes is not worth it. Codes follow C/glibc `strftime`, which Python delegates
//! to, including glibc's `-` flag (`%-d`) that templates use for unpadded numbers.

use std::time::{SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Formats the current time (UTC).
pub(super) fn strftime_utc_now(format: &str) -> String {
    let secs = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(0),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(0),
    };
    strftime_utc(format, secs)
}

/// A broken-down UTC time.
struct Civil {
    year: i64,
    month: usize,   // 1..=12
    day: i64,       // 1..=31
    yday: i64,      // 1..=366
    weekday: usize, // 0 = Sunday
    hour: i64,
    minute: i64,
    second: i64,
}

fn civil(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-from-civil inverse (proleptic Gregorian, era = 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = usize::try_from(month - 1).unwrap_or(0).min(11);
    let yday = CUMULATIVE[month_idx] + day + i64::from(leap && month > 2);
    Civil {
        year,
        month: month_idx + 1,
        day,
        yday,
        // 1970-01-01 was a Thursday.
        weekday: usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0),
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
    }
}

/// Formats `secs` since the Unix epoch (UTC) with a C `strftime` format. Unknown codes are
/// copied through unchanged, as glibc does.
pub(super) fn strftime_utc(format: &str, secs: i64) -> String {
    let t = civil(secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.next_if_eq(&'-').is_some();
        let num = |out: &mut String, v: i64, width: usize| {
            if unpadded {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&format!("{v:0width$}"));
            }
        };
        let hour12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
        match chars.next() {
            Some('Y') => out.push_str(&t.year.to_string()),
            Some('y') => num(&mut out, t.year.rem_euclid(100), 2),
            Some('C') => num(&mut out, t.year.div_euclid(100), 2),
            Some('m') => num(&mut out, t.month as i64, 2),
            Some('d') => num(&mut out, t.day, 2),
            Some('e') if unpadded => num(&mut out, t.day, 2),
            Some('e') => out.push_str(&format!("{:2}", t.day)),
            Some('j') => num(&mut out, t.yday, 3),
            Some('H') => num(&mut out, t.hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, t.minute, 2),
            Some('S') => num(&mut out, t.second, 2),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[t.month - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[t.month - 1][..3]),
            Some('A') => out.push_str(WEEKDAYS[t.weekday]),
            Some('a') => out.push_str(&WEEKDAYS[t.weekday][..3]),
            Some('u') => out.push_str(&(if t.weekday == 0 { 7 } else { t.weekday }).to_string()),
            Some('w') => out.push_str(&t.weekday.to_string()),
            Some('F') => out.push_str(&format!("{}-{:02}-{:02}", t.year, t.month, t.day)),
            Some('D') => out.push_str(&format!(
                "{:02}/{:02}/{:02}",
                t.month,
                t.day,
                t.year.rem_euclid(100)
            )),
            Some('T') => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)),
            Some('R') => out.push_str(&format!("{:02}:{:02}", t.hour, t.minute)),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if unpadded {
                    out.push('-');
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_glibc() {
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(strftime_utc("%B %-d, %Y", t), "February 29, 2024");
        assert_eq!(
            strftime_utc("%A %a %j %H:%M:%S %I%p %y %F %T %% %q", t),
            "Thursday Thu 060 13:05:09 01PM 24 2024-02-29 13:05:09 % %q"
        );
        assert_eq!(strftime_utc("%e|%-m|%", 0), " 1|1|%");
        assert_eq!(strftime_utc("%Y-%m-%d %a", -86_400), "1969-12-31 Wed");
        assert_eq!(strftime_utc("%j", 1_735_603_200), "366"); // 2024-12-31
    }

    #[test]
    fn now_has_a_plausible_year() {
        let year: i64 = strftime_utc_now("%Y").parse().unwrap();
        assert!(year >= 2024);
    }
}
