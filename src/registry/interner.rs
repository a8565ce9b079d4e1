//! Bounded string interners for PFNs, provider ids and channel URI prefixes.
//!
//! Both directions read without taking a lock: string to id through a papaya
//! map, id to string through append-only segments of `OnceLock`s. Only
//! adding a new string takes a mutex. An interner holds at most its capacity
//! of strings, each at most [`MAX_INTERNED_LEN`] bytes; past that the caller
//! stores the string inline in the record, so input an attacker controls
//! cannot grow an interner without bound.

use parking_lot::Mutex;
use std::sync::OnceLock;

/// Most strings one interner holds; ids are `0..DEFAULT_CAPACITY`, leaving
/// two `u16` values free for "inline" and "none" markers in records.
pub const DEFAULT_CAPACITY: u16 = u16::MAX - 1;

/// Longest string an interner accepts, in bytes.
pub const MAX_INTERNED_LEN: usize = 256;

const SEGMENT: usize = 1024;

/// `SEGMENT` slots, each set once.
type Segment = Box<[OnceLock<Box<str>>]>;

/// A bounded, append-only map between strings and dense `u16` ids.
pub struct Interner {
    ids: papaya::HashMap<Box<str>, u16>,
    segments: Box<[OnceLock<Segment>]>,
    /// Number of ids handed out; held while adding a string.
    next: Mutex<u16>,
    capacity: u16,
}

impl Interner {
    /// An interner for at most `capacity` strings (capped at
    /// [`DEFAULT_CAPACITY`]).
    pub fn new(capacity: u16) -> Interner {
        let capacity = capacity.min(DEFAULT_CAPACITY);
        let segments = usize::from(capacity).div_ceil(SEGMENT);
        Interner {
            ids: papaya::HashMap::new(),
            segments: (0..segments).map(|_| OnceLock::new()).collect(),
            next: Mutex::new(0),
            capacity,
        }
    }

    /// The id of `s`, adding it if there is room. `None` when the interner
    /// is full or `s` is too long to intern.
    pub fn intern(&self, s: &str) -> Option<u16> {
        if let Some(&id) = self.ids.pin().get(s) {
            return Some(id);
        }
        if s.len() > MAX_INTERNED_LEN {
            return None;
        }
        let mut next = self.next.lock();
        if let Some(&id) = self.ids.pin().get(s) {
            return Some(id);
        }
        let id = *next;
        if id >= self.capacity {
            return None;
        }
        let seg = self.segments[usize::from(id) / SEGMENT]
            .get_or_init(|| (0..SEGMENT).map(|_| OnceLock::new()).collect());
        // The slot is empty: ids are handed out once, under `next`.
        let _ = seg[usize::from(id) % SEGMENT].set(Box::from(s));
        // Publish id -> string before string -> id, so that any id a reader
        // obtains resolves.
        self.ids.pin().insert(Box::from(s), id);
        *next = id + 1;
        Some(id)
    }

    /// The string with id `id`, if it was handed out.
    pub fn resolve(&self, id: u16) -> Option<&str> {
        let seg = self.segments.get(usize::from(id) / SEGMENT)?.get()?;
        seg[usize::from(id) % SEGMENT].get().map(|s| &**s)
    }

    /// Number of strings held.
    pub fn len(&self) -> usize {
        usize::from(*self.next.lock())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_and_resolves() {
        let i = Interner::new(DEFAULT_CAPACITY);
        let a = i.intern("Contoso.MDM_8wekyb3d8bbwe").unwrap();
        let b = i.intern("Fabrikam.MDM_8wekyb3d8bbwe").unwrap();
        assert_ne!(a, b);
        assert_eq!(i.intern("Contoso.MDM_8wekyb3d8bbwe"), Some(a));
        assert_eq!(i.resolve(a), Some("Contoso.MDM_8wekyb3d8bbwe"));
        assert_eq!(i.resolve(b), Some("Fabrikam.MDM_8wekyb3d8bbwe"));
        assert_eq!(i.resolve(b + 1), None);
        assert_eq!(i.resolve(u16::MAX), None);
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn full_and_long_strings_are_refused() {
        let i = Interner::new(3);
        for n in 0..3 {
            assert_eq!(i.intern(&format!("s{n}")), Some(n));
        }
        assert_eq!(i.intern("s3"), None);
        assert_eq!(i.intern("s1"), Some(1));
        assert_eq!(i.len(), 3);
        let j = Interner::new(10);
        assert_eq!(j.intern(&"x".repeat(MAX_INTERNED_LEN + 1)), None);
        assert!(j.intern(&"x".repeat(MAX_INTERNED_LEN)).is_some());
    }

    #[test]
    #[cfg_attr(miri, ignore = "65 534 strings: too slow under Miri")]
    fn fills_to_default_capacity_across_segments() {
        let i = Interner::new(DEFAULT_CAPACITY);
        for n in 0..DEFAULT_CAPACITY {
            assert_eq!(i.intern(&n.to_string()), Some(n));
        }
        assert_eq!(i.intern("one more"), None);
        assert_eq!(i.resolve(DEFAULT_CAPACITY - 1), Some("65533"));
        assert_eq!(i.resolve(1500), Some("1500"));
    }

    #[test]
    fn concurrent_interning_agrees() {
        let i = Interner::new(DEFAULT_CAPACITY);
        let ids: Vec<Vec<u16>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..500)
                            .map(|n| i.intern(&format!("p{n}")).unwrap())
                            .collect()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ids[0], ids[1]);
        assert_eq!(i.len(), 500);
        for (n, &id) in ids[0].iter().enumerate() {
            assert_eq!(i.resolve(id), Some(format!("p{n}").as_str()));
        }
    }
}
