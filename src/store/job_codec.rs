//! The on-disk encoding of a refresh [`Job`].
//!
//! Key: the job id, u64 big-endian, so jobs scan in id (creation) order.
//!
//! Value, format version 1 (integers little-endian):
//!
//! ```text
//! u8   version (= 1)
//! u8   device_id length, then its bytes
//! u8   pfn length, then its bytes
//! u8   provider_id length + 1 (0: none), then its bytes
//! u8   reason        0 age, 1 WNS 404, 2 WNS 410, 3 credential mismatch
//! u32  expired_at
//! u32  created_at
//! u16  attempts
//! u8   state         0 queued, 1 leased, 2 delivered
//! u32  state_at      leased: lease end; delivered: delivery time; else 0
//! u8   via           0 check-in, 1 lease, 2 webhook (leased, delivered)
//! u32  next_at
//! ```
//!
//! Ids, PFNs and provider ids are validated to at most 128, 128 and 64
//! bytes, so one length byte suffices. Decoding never panics: a malformed
//! value is a [`StoreError::Corrupt`] naming the job.

use super::StoreError;
use crate::core::lifecycle::LeaveReason;
use crate::core::refresh::{Handout, Job, JobId, JobState};
use crate::core::{DeviceId, Pfn, ProviderId, UnixTime};

/// The value format this build writes.
pub const FORMAT_VERSION: u8 = 1;

fn reason_code(r: LeaveReason) -> u8 {
    match r {
        LeaveReason::Age => 0,
        LeaveReason::Wns404 => 1,
        LeaveReason::Wns410 => 2,
        LeaveReason::CredentialMismatch => 3,
    }
}

fn reason_from(c: u8) -> Option<LeaveReason> {
    Some(match c {
        0 => LeaveReason::Age,
        1 => LeaveReason::Wns404,
        2 => LeaveReason::Wns410,
        3 => LeaveReason::CredentialMismatch,
        _ => return None,
    })
}

fn via_code(h: Handout) -> u8 {
    match h {
        Handout::CheckIn => 0,
        Handout::Lease => 1,
        Handout::Webhook => 2,
    }
}

fn via_from(c: u8) -> Option<Handout> {
    Some(match c {
        0 => Handout::CheckIn,
        1 => Handout::Lease,
        2 => Handout::Webhook,
        _ => return None,
    })
}

fn put_str(out: &mut Vec<u8>, s: &str, plus: u8) {
    // Validated ids are far below 255 bytes; a longer one would be a bug
    // upstream, and truncating the length would corrupt the value.
    let len = u8::try_from(s.len() + usize::from(plus)).expect("validated id fits a length byte");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

/// Appends the value encoding of `job` to `out`.
pub fn encode_into(job: &Job, out: &mut Vec<u8>) {
    out.push(FORMAT_VERSION);
    put_str(out, job.device_id.as_str(), 0);
    put_str(out, job.pfn.as_str(), 0);
    match &job.provider_id {
        None => out.push(0),
        Some(p) => put_str(out, p.as_str(), 1),
    }
    out.push(reason_code(job.reason));
    out.extend_from_slice(&job.expired_at.0.to_le_bytes());
    out.extend_from_slice(&job.created_at.0.to_le_bytes());
    out.extend_from_slice(&job.attempts.to_le_bytes());
    let (state, at, via) = match job.state {
        JobState::Queued => (0u8, 0u32, 0u8),
        JobState::Leased { until, via } => (1, until.0, via_code(via)),
        JobState::Delivered { at, via } => (2, at.0, via_code(via)),
    };
    out.push(state);
    out.extend_from_slice(&at.to_le_bytes());
    out.push(via);
    out.extend_from_slice(&job.next_at.0.to_le_bytes());
}

/// The value encoding of `job`.
pub fn encode(job: &Job) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    encode_into(job, &mut out);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.0.len() {
            return Err("value is truncated");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn str(&mut self, len: usize) -> Result<&'a str, &'static str> {
        std::str::from_utf8(self.take(len)?).map_err(|_| "a string is not UTF-8")
    }
}

/// Decodes the job stored under `key` with value `value`.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Job, StoreError> {
    decode_job(key, value).map_err(|why| StoreError::Corrupt {
        key: format!("job {key:?}"),
        why: why.to_owned(),
    })
}

fn decode_job(key: &[u8], value: &[u8]) -> Result<Job, &'static str> {
    let id: JobId = u64::from_be_bytes(key.try_into().map_err(|_| "job key is not 8 bytes")?);
    let mut r = Reader(value);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err("unknown job format version");
    }
    let n = usize::from(r.u8()?);
    let device_id = DeviceId::parse_stored(r.str(n)?).map_err(|_| "invalid device id")?;
    let n = usize::from(r.u8()?);
    let pfn = Pfn::parse(r.str(n)?).map_err(|_| "invalid pfn")?;
    let provider_id = match r.u8()? {
        0 => None,
        n => {
            Some(ProviderId::parse(r.str(usize::from(n) - 1)?).map_err(|_| "invalid provider id")?)
        }
    };
    let reason = reason_from(r.u8()?).ok_or("unknown reason code")?;
    let expired_at = UnixTime(r.u32()?);
    let created_at = UnixTime(r.u32()?);
    let attempts = r.u16()?;
    let state = r.u8()?;
    let at = UnixTime(r.u32()?);
    let via = via_from(r.u8()?).ok_or("unknown hand-out code")?;
    let state = match state {
        0 => JobState::Queued,
        1 => JobState::Leased { until: at, via },
        2 => JobState::Delivered { at, via },
        _ => return Err("unknown job state"),
    };
    let next_at = UnixTime(r.u32()?);
    if !r.0.is_empty() {
        return Err("trailing bytes after the job");
    }
    Ok(Job {
        id,
        device_id,
        pfn,
        provider_id,
        reason,
        expired_at,
        created_at,
        attempts,
        state,
        next_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(provider: Option<&str>, state: JobState) -> Job {
        Job {
            id: 1 << 40,
            device_id: DeviceId::parse("6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11").unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            provider_id: provider.map(|p| ProviderId::parse(p).unwrap()),
            reason: LeaveReason::Wns410,
            expired_at: UnixTime(1_800_000_000),
            created_at: UnixTime(1_800_000_100),
            attempts: 3,
            state,
            next_at: UnixTime(1_800_003_700),
        }
    }

    #[test]
    fn every_state_round_trips() {
        for state in [
            JobState::Queued,
            JobState::Leased {
                until: UnixTime(5),
                via: Handout::Lease,
            },
            JobState::Delivered {
                at: UnixTime(6),
                via: Handout::Webhook,
            },
            JobState::Delivered {
                at: UnixTime(7),
                via: Handout::CheckIn,
            },
        ] {
            for provider in [None, Some("Contoso-MDM")] {
                let j = job(provider, state);
                let v = encode(&j);
                assert_eq!(decode(&j.id.to_be_bytes(), &v).unwrap(), j);
            }
        }
    }

    #[test]
    fn malformed_values_are_errors() {
        let j = job(Some("P"), JobState::Queued);
        let v = encode(&j);
        let k = j.id.to_be_bytes();
        for cut in 0..v.len() {
            assert!(decode(&k, &v[..cut]).is_err(), "prefix of {cut} bytes");
        }
        let mut long = v.clone();
        long.push(0);
        assert!(decode(&k, &long).is_err());
        let mut bad_version = v.clone();
        bad_version[0] = 9;
        assert!(decode(&k, &bad_version).is_err());
        assert!(decode(&k[..7], &v).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&7u64.to_be_bytes(), &v);
        }
    }
}
