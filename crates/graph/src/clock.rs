//! Time and identifiers: [`Timestamp`], the injectable [`Clock`] and [`IdSource`].
//!
//! Both are injected into a [`Runner`](crate::Runner) so that tests get the same ids and times on
//! every run ([`ManualClock`], [`SequentialIds`]).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time: microseconds since the Unix epoch, UTC.
///
/// Its text form is RFC 3339 with microseconds, as pydantic writes a UTC `datetime`:
/// `2025-01-31T12:00:00.000001Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The time `micros` microseconds after the Unix epoch.
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// The system's current time.
    pub fn now() -> Self {
        let micros = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
        };
        Self(micros)
    }

    /// This time plus `duration` (saturating).
    pub fn plus(self, duration: Duration) -> Self {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }

    /// The time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        let micros = self.0.saturating_sub(earlier.0);
        Duration::from_micros(u64::try_from(micros).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}

/// The text was not an RFC 3339 date and time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timestamp {0:?}: expected RFC 3339, e.g. 2025-01-31T12:00:00.000001Z")]
pub struct ParseTimestampError(String);

impl FromStr for Timestamp {
    type Err = ParseTimestampError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_rfc3339(text).ok_or_else(|| ParseTimestampError(text.to_owned()))
    }
}

fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(digits).enumerate() {
            if i < 6 {
                micros = micros * 10 + i64::from(c - b'0');
            }
        }
        for _ in digits..6 {
            micros *= 10;
        }
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || rb[3] != b':' {
                return None;
            }
            let sign = match rb[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let month = u32::try_from(month).ok()?;
    let day = u32::try_from(day).ok()?;
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(Timestamp(secs * 1_000_000 + micros))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// A proleptic Gregorian date to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a runner reads the time: leases, `start_ts`, durations.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.as_micros()))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_add(micros, Ordering::SeqCst);
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: Timestamp) {
        self.0.store(to.as_micros(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Where a runner takes the random part of run and snapshot ids: 32 lowercase hex digits, as
/// pydantic_graph's `uuid4().hex`.
pub trait IdSource: Send + Sync + fmt::Debug + 'static {
    /// A fresh 128-bit id, never returned before by this source.
    fn next_id(&self) -> u128;

    /// A fresh id as 32 lowercase hex digits.
    fn next_hex(&self) -> String {
        hex32(self.next_id())
    }
}

/// Ids unique across processes, and increasing within a source: the source's start time (48
/// bits of milliseconds) and 16 random bits, then a random 64-bit start plus a counter.
///
/// Increasing ids keep the database indexes on them growing at one end, where an insert is
/// cheap, instead of splitting pages all over the index (random ids, as `uuid4`, cost several
/// times more per insert in SQLite once the table is large).
#[derive(Debug)]
pub struct RandomIds {
    prefix: u64,
    start: u64,
    counter: AtomicU64,
}

impl RandomIds {
    /// A source with a fresh random key.
    pub fn new() -> Self {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let millis = u64::try_from(Timestamp::now().as_micros() / 1000).unwrap_or(0);
        // Start low enough in the 64-bit half that the counter never wraps in practice.
        Self {
            prefix: (millis << 16) | (a & 0xffff),
            start: b >> 1,
            counter: AtomicU64::new(0),
        }
    }
}

impl Default for RandomIds {
    fn default() -> Self {
        Self::new()
    }
}

impl IdSource for RandomIds {
    fn next_id(&self) -> u128 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        (u128::from(self.prefix) << 64) | u128::from(self.start.wrapping_add(n))
    }
}

/// Ids `000…001`, `000…002`, … for tests that compare ids.
#[derive(Debug, Default)]
pub struct SequentialIds(AtomicU64);

impl SequentialIds {
    /// A source whose first id is `1`.
    pub fn new() -> Self {
        Self::default()
    }
}

impl IdSource for SequentialIds {
    fn next_id(&self) -> u128 {
        u128::from(self.0.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

/// `n` as 32 lowercase hex digits (`format!("{n:032x}")` without the formatting machinery,
/// which shows in the cost of a step).
fn hex32(n: u128) -> String {
    let digits = hex_digits(n);
    std::str::from_utf8(&digits).unwrap_or_default().to_owned()
}

/// `n` as 32 lowercase ASCII hex digits, on the stack.
pub(crate) fn hex_digits(n: u128) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, micros: i64, canonical: &str) {
        let ts: Timestamp = text.parse().unwrap();
        assert_eq!(ts.as_micros(), micros, "{text}");
        assert_eq!(ts.to_string(), canonical);
        assert_eq!(canonical.parse::<Timestamp>().unwrap(), ts);
    }

    #[test]
    fn timestamps_round_trip() {
        check("1970-01-01T00:00:00Z", 0, "1970-01-01T00:00:00.000000Z");
        check(
            "2025-01-31T12:34:56.123456Z",
            1_738_326_896_123_456,
            "2025-01-31T12:34:56.123456Z",
        );
        check(
            "2025-01-31T13:34:56.1234567+01:00",
            1_738_326_896_123_456,
            "2025-01-31T12:34:56.123456Z",
        );
        check(
            "2000-02-29T00:00:00.5Z",
            951_782_400_500_000,
            "2000-02-29T00:00:00.500000Z",
        );
        check(
            "1969-12-31T23:59:59.999999Z",
            -1,
            "1969-12-31T23:59:59.999999Z",
        );
        for bad in [
            "",
            "2025-13-01T00:00:00Z",
            "2025-01-01T00:00:00",
            "2025-01-01T00:00:00.Z",
        ] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_are_hex_and_distinct() {
        let ids = RandomIds::new();
        let a = ids.next_hex();
        let b = ids.next_hex();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        let seq = SequentialIds::new();
        assert_eq!(seq.next_hex(), "00000000000000000000000000000001");
        assert_eq!(
            hex32(0xfedc_ba98_7654_3210_0123_4567_89ab_cdef),
            "fedcba98765432100123456789abcdef"
        );
    }
}
