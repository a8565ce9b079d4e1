//! The encoding of one committed batch of mutations: the payload of one
//! log [frame](super::frame) of the embedded backend.
//!
//! Format version 1 (integers little-endian, `leb` is unsigned LEB128):
//!
//! ```text
//! u8   version (= 1)
//! leb  mutations in the batch
//! then, for each mutation, a tag and its fields:
//!   1 Put        leb len, device id; leb len, record value (codec.rs)
//!   2 Delete     leb len, device id
//!   3 Guard      leb len, device id; u8 0 (absent) or 1 then leb len, channel URI
//!   4            (reserved)
//!   5 PutJob     u64 job id; leb len, job value (job_codec.rs)
//!   6 DeleteJob  u64 job id
//! ```
//!
//! Records and jobs use the store's own value encodings, so one format
//! describes a device wherever it is kept. Decoding never panics: a
//! malformed payload is an error naming what is wrong (the frame around it
//! was checksummed, so this means a bug or a newer format, not a torn
//! write).

use super::codec::put_leb;
use super::{codec, job_codec, Mutation};
use crate::core::{ChannelUri, DeviceId};

/// The batch format this build writes.
pub const FORMAT_VERSION: u8 = 1;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const GUARD: u8 = 3;
const PUT_JOB: u8 = 5;
const DELETE_JOB: u8 = 6;

/// Why a batch payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("unknown batch format version {0} (this build reads {FORMAT_VERSION})")]
    Version(u8),
    #[error("the batch ends inside a mutation")]
    Truncated,
    #[error("unknown mutation tag {0}")]
    Tag(u8),
    #[error("a length is not a valid LEB128 number")]
    Length,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} bytes after the last mutation")]
    Trailing(usize),
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_leb(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends the encoding of `batch` to `out`.
pub fn encode_into(batch: &[Mutation], out: &mut Vec<u8>) {
    out.push(FORMAT_VERSION);
    put_leb(out, batch.len() as u64);
    for m in batch {
        match m {
            Mutation::Put(rec) => {
                out.push(PUT);
                put_bytes(out, rec.device_id.as_str().as_bytes());
                put_bytes(out, &codec::encode_value(rec));
            }
            Mutation::Delete(id) => {
                out.push(DELETE);
                put_bytes(out, id.as_str().as_bytes());
            }
            Mutation::Guard {
                device_id,
                channel_uri,
            } => {
                out.push(GUARD);
                put_bytes(out, device_id.as_str().as_bytes());
                match channel_uri {
                    None => out.push(0),
                    Some(u) => {
                        out.push(1);
                        put_bytes(out, u.as_str().as_bytes());
                    }
                }
            }
            Mutation::PutJob(job) => {
                out.push(PUT_JOB);
                out.extend_from_slice(&job.id.to_le_bytes());
                put_bytes(out, &job_codec::encode(job));
            }
            Mutation::DeleteJob(id) => {
                out.push(DELETE_JOB);
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
}

/// The encoding of `batch`.
pub fn encode(batch: &[Mutation]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(batch, &mut out);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if self.0.len() < n {
            return Err(BatchError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, BatchError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, BatchError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn leb(&mut self) -> Result<u64, BatchError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(BatchError::Length)
    }

    fn bytes(&mut self) -> Result<&'a [u8], BatchError> {
        let n = usize::try_from(self.leb()?).map_err(|_| BatchError::Length)?;
        self.take(n)
    }

    fn device_id(&mut self) -> Result<DeviceId, BatchError> {
        std::str::from_utf8(self.bytes()?)
            .ok()
            .and_then(|s| DeviceId::parse_stored(s).ok())
            .ok_or_else(|| BatchError::Invalid("a device id is not valid".into()))
    }
}

/// Decodes a batch payload.
pub fn decode(payload: &[u8]) -> Result<Vec<Mutation>, BatchError> {
    let mut r = Reader(payload);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(BatchError::Version(version));
    }
    let count = r.leb()?;
    // Each mutation takes at least two bytes: a count larger than that is
    // a bad length, not a reason to reserve memory.
    if count > payload.len() as u64 {
        return Err(BatchError::Length);
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let m = match r.u8()? {
            PUT => {
                let key = r.bytes()?;
                let value = r.bytes()?;
                let rec = codec::decode_record(key, value)
                    .map_err(|e| BatchError::Invalid(format!("a record: {e}")))?;
                Mutation::Put(rec)
            }
            DELETE => Mutation::Delete(r.device_id()?),
            GUARD => {
                let device_id = r.device_id()?;
                let channel_uri = match r.u8()? {
                    0 => None,
                    1 => Some(
                        std::str::from_utf8(r.bytes()?)
                            .ok()
                            .and_then(|s| ChannelUri::from_trusted(s.to_owned()))
                            .ok_or_else(|| {
                                BatchError::Invalid("a guard's channel URI is not valid".into())
                            })?,
                    ),
                    _ => return Err(BatchError::Invalid("a guard's URI flag".into())),
                };
                Mutation::Guard {
                    device_id,
                    channel_uri,
                }
            }
            PUT_JOB => {
                let id = r.u64()?;
                let value = r.bytes()?;
                let job = job_codec::decode(&id.to_be_bytes(), value)
                    .map_err(|e| BatchError::Invalid(format!("a job: {e}")))?;
                Mutation::PutJob(job)
            }
            DELETE_JOB => Mutation::DeleteJob(r.u64()?),
            tag => return Err(BatchError::Tag(tag)),
        };
        out.push(m);
    }
    if !r.0.is_empty() {
        return Err(BatchError::Trailing(r.0.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lifecycle::LeaveReason;
    use crate::core::refresh::{Handout, Job, JobState};
    use crate::core::{Pfn, UnixTime};
    use crate::testing::arb_record;
    use proptest::prelude::*;

    fn arb_job() -> impl Strategy<Value = Job> {
        (arb_record(), any::<u64>(), any::<u16>(), 0u8..3).prop_map(|(rec, id, attempts, st)| Job {
            id,
            device_id: rec.device_id,
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            provider_id: rec.provider_id,
            reason: LeaveReason::Wns404,
            expired_at: rec.issued_at,
            created_at: UnixTime(rec.issued_at.0 / 2),
            attempts,
            state: match st {
                0 => JobState::Queued,
                1 => JobState::Leased {
                    until: UnixTime(9),
                    via: Handout::Lease,
                },
                _ => JobState::Delivered {
                    at: UnixTime(8),
                    via: Handout::Webhook,
                },
            },
            next_at: UnixTime(7),
        })
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            arb_record().prop_map(Mutation::Put),
            arb_record().prop_map(|r| Mutation::Delete(r.device_id)),
            (arb_record(), any::<bool>()).prop_map(|(r, some)| Mutation::Guard {
                device_id: r.device_id,
                channel_uri: some.then_some(r.channel_uri),
            }),
            arb_job().prop_map(Mutation::PutJob),
            any::<u64>().prop_map(Mutation::DeleteJob),
        ]
    }

    proptest! {
        #[test]
        fn batches_round_trip(batch in prop::collection::vec(arb_mutation(), 0..12)) {
            prop_assert_eq!(decode(&encode(&batch)).unwrap(), batch);
        }

        #[test]
        fn every_cut_short_batch_is_an_error(batch in prop::collection::vec(arb_mutation(), 1..4)) {
            let bytes = encode(&batch);
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err(), "cut at {}", cut);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn unknown_versions_tags_and_trailing_bytes_are_named() {
        assert_eq!(decode(&[2, 0]), Err(BatchError::Version(2)));
        assert_eq!(decode(&[1, 1, 9]), Err(BatchError::Tag(9)));
        assert_eq!(decode(&[1, 0, 0]), Err(BatchError::Trailing(1)));
        assert_eq!(
            decode(&[1, 0xff, 0xff, 0xff, 0x7f]),
            Err(BatchError::Length)
        );
        assert_eq!(decode(&encode(&[])), Ok(vec![]));
    }
}
