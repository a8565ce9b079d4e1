//! Behaviour of the registry as a whole: round trips, replace and remove
//! semantics, state counts, concurrency, interner fallback.

use super::*;
use crate::core::{
    ChannelUri, DeadMark, DeadReason, DeviceId, LifecycleState, Pfn, ProviderId, RefreshMark,
    RefreshState, UriPolicy,
};
use proptest::prelude::*;
use std::collections::HashMap;

const DAY: u32 = 86_400;
const T0: u32 = 1_795_000_000;

fn uri(s: &str) -> ChannelUri {
    ChannelUri::parse(s, &UriPolicy::default()).unwrap()
}

fn rec(id: &str, issued_at: u32) -> DeviceRecord {
    DeviceRecord {
        device_id: DeviceId::parse(id).unwrap(),
        pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
        channel_uri: uri("https://db5.notify.windows.com/?token=AwYAAAD8sUbJZq5PGQ2%2bT4nW1y%3d"),
        provider_id: Some(ProviderId::parse("Contoso-MDM").unwrap()),
        issued_at: UnixTime(issued_at),
        dead: None,
        refresh: None,
    }
}

fn refresh(state: RefreshState, job: u64) -> Option<RefreshMark> {
    Some(RefreshMark {
        state,
        since: UnixTime(T0),
        job,
    })
}

fn dead(at: u32) -> Option<DeadMark> {
    Some(DeadMark {
        reason: DeadReason::Wns410,
        at: UnixTime(at),
    })
}

/// Counts by visiting every record, classified by its own `issued_at`.
fn brute_counts(reg: &Registry, th: &Thresholds, now: UnixTime) -> StateCounts {
    let mut c = [0u64; 5];
    reg.for_each(|r| {
        let st = r.state_at(th, now).state;
        c[LifecycleState::ALL.iter().position(|&s| s == st).unwrap()] += 1;
    });
    c
}

// --- strategies -------------------------------------------------------------

fn device_id() -> impl Strategy<Value = DeviceId> {
    prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}",
        "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        "\\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\\}",
        "[!-~]{1,128}",
    ]
    .prop_filter_map("valid device id", |s| DeviceId::parse(&s).ok())
}

fn channel_uri() -> impl Strategy<Value = ChannelUri> {
    let host = prop_oneof![
        Just("db5.notify.windows.com"),
        Just("BN2.Notify.Windows.Com"),
        Just("wns2-by3p.notify.windows.com"),
        Just("notify.windows.com"),
    ];
    let tail = prop_oneof![
        // Packable token.
        "[A-Za-z0-9%]{0,250}".prop_map(|t| format!("/?token={t}")),
        // Token with other characters (none of '#', '"', '<', '>', '`',
        // which registration refuses).
        "[!$-;=?-_a-~]{0,250}".prop_map(|t| format!("/?token={t}")),
        // No token at all, or a token not right after the path.
        "/[a-z0-9/]{0,20}(\\?[a-z=&]{0,30})?",
        "/w/[A-Za-z0-9%]{0,40}\\?token=[A-Za-z0-9%]{0,40}",
    ];
    (host, tail).prop_map(|(h, t)| uri(&format!("https://{h}{t}")))
}

/// Shapes only `ChannelUri::from_trusted` lets through (e.g. loaded from the
/// store): non-ASCII bytes, an odd scheme case, no path.
fn trusted_uri() -> impl Strategy<Value = ChannelUri> {
    "\\PC{0,40}".prop_filter_map("https-shaped", |t| {
        ChannelUri::from_trusted(format!("HTTPS://db5.notify.windows.com{t}"))
    })
}

fn record() -> impl Strategy<Value = DeviceRecord> {
    (
        device_id(),
        "[A-Za-z0-9.-]{3,50}_[a-z0-9]{13}",
        prop_oneof![3 => channel_uri(), 1 => trusted_uri()],
        proptest::option::of("[A-Za-z0-9._-]{1,64}"),
        any::<u32>(),
        proptest::option::of((1u8..=3, any::<u32>())),
        proptest::option::of((1u8..=2, any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |(device_id, pfn, channel_uri, provider, issued, dead, refresh)| DeviceRecord {
                device_id,
                pfn: Pfn::parse(&pfn).unwrap(),
                channel_uri,
                provider_id: provider.map(|p| ProviderId::parse(&p).unwrap()),
                issued_at: UnixTime(issued),
                dead: dead.map(|(code, at)| DeadMark {
                    reason: DeadReason::from_code(code).unwrap(),
                    at: UnixTime(at),
                }),
                refresh: refresh.map(|(code, since, job)| crate::core::RefreshMark {
                    state: crate::core::RefreshState::from_code(code).unwrap(),
                    since: UnixTime(since),
                    job,
                }),
            },
        )
}

// --- unit tests -------------------------------------------------------------

#[test]
fn upsert_get_replace_remove() {
    let reg = Registry::new();
    assert!(reg.is_empty());
    let id = "6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11";
    let a = rec(id, T0);
    assert!(reg.upsert(&a));
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.get(id), Some(a.clone()));
    assert_eq!(reg.get("6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11"), None);

    let mut b = rec(id, T0 + 10);
    b.channel_uri = uri("https://bn2.notify.windows.com/?token=other");
    b.provider_id = None;
    assert!(!reg.upsert(&b), "replacing returns false");
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.get(id), Some(b));

    assert!(reg.remove(id));
    assert!(!reg.remove(id));
    assert_eq!(reg.get(id), None);
    assert!(reg.is_empty());
    assert!(!reg.remove(&"x".repeat(500)));
    assert_eq!(reg.get(&"x".repeat(500)), None);
    assert_eq!(reg.get(""), None);
}

#[test]
fn counts_move_on_replace_and_remove() {
    let th = Thresholds::default();
    let now = UnixTime(T0 + 20 * DAY + 30);
    let reg = Registry::new();
    let idx = |s: LifecycleState| LifecycleState::ALL.iter().position(|&x| x == s).unwrap();
    let (active, due, expired) = (
        idx(LifecycleState::Active),
        idx(LifecycleState::RenewalDue),
        idx(LifecycleState::Expired),
    );

    reg.upsert(&rec("a", T0 + 20 * DAY)); // active
    reg.upsert(&rec("b", T0)); // renewal due
    reg.upsert(&rec("c", T0 - 20 * DAY)); // expired by age
    let mut d = rec("d", T0 + 20 * DAY);
    d.dead = dead(T0);
    reg.upsert(&d); // expired by verdict
    assert_eq!(reg.state_counts(&th, now), [1, 1, 2, 0, 0]);

    // Renewal: "b" gets a new channel.
    reg.upsert(&rec("b", T0 + 20 * DAY));
    assert_eq!(reg.state_counts(&th, now), [2, 0, 2, 0, 0]);
    // WNS declares "a" dead.
    let mut a = rec("a", T0 + 20 * DAY);
    a.dead = dead(T0 + 20 * DAY + 1);
    reg.upsert(&a);
    assert_eq!(reg.state_counts(&th, now), [1, 0, 3, 0, 0]);
    // A new registration clears the dead mark.
    reg.upsert(&rec("d", T0 + 5 * DAY));
    let c = reg.state_counts(&th, now);
    assert_eq!((c[active], c[due], c[expired]), (1, 1, 2));
    // Same record again: nothing moves.
    reg.upsert(&rec("d", T0 + 5 * DAY));
    assert_eq!(reg.state_counts(&th, now), c);

    for (id, left) in [("a", 3), ("b", 2), ("c", 1), ("d", 0)] {
        assert!(reg.remove(id));
        assert_eq!(reg.state_counts(&th, now).iter().sum::<u64>(), left);
    }
    assert_eq!(reg.state_counts(&th, now), [0; 5]);
    assert_eq!(reg.state_counts(&th, UnixTime::MAX), [0; 5]);
}

#[test]
fn counts_classify_minutes_by_their_start() {
    let th = Thresholds {
        renewal_due_after: 600,
        expire_after: 1200,
    };
    let reg = Registry::new();
    // Issued at second 30 of a minute: the device itself is due at 60 630,
    // its minute's bucket (starting at 60 000) at 60 600.
    reg.upsert(&rec("a", 60 * 1000 + 30));
    let counts = |now: u32| reg.state_counts(&th, UnixTime(now));
    assert_eq!(counts(60_599), [1, 0, 0, 0, 0]);
    // In between, the count runs ahead of the device by under a minute.
    assert_eq!(counts(60_600), [0, 1, 0, 0, 0]);
    assert_eq!(counts(60_630), [0, 1, 0, 0, 0]);
    assert_eq!(counts(61_199), [0, 1, 0, 0, 0]);
    assert_eq!(counts(61_200), [0, 0, 1, 0, 0]);
}

#[test]
fn full_interners_fall_back_to_inline() {
    let reg = Registry::with_codec(
        Partitioning::default(),
        0,
        RecordCodec::with_interner_capacity(2),
    );
    let mut all = Vec::new();
    for i in 0..20u32 {
        let mut r = rec(&format!("dev-{i}"), T0 + i);
        r.pfn = Pfn::parse(&format!("App{i}.Name_8wekyb3d8bbwe")).unwrap();
        r.provider_id = Some(ProviderId::parse(&format!("Prov{i}")).unwrap());
        r.channel_uri = uri(&format!("https://h{i}.notify.windows.com/?token=T{i}%2b"));
        assert!(reg.upsert(&r));
        all.push(r);
    }
    assert_eq!(reg.codec.interned(), [2, 2, 2]);
    for r in &all {
        assert_eq!(reg.get(r.device_id.as_str()).as_ref(), Some(r));
    }
    // An interned string still interns after the interner filled up.
    let mut r = rec("again", T0);
    r.pfn = all[1].pfn.clone();
    reg.upsert(&r);
    assert_eq!(reg.get("again"), Some(r));
}

#[test]
fn for_each_visits_every_record_once() {
    let reg = Registry::with_capacity(100);
    for i in 0..100 {
        reg.upsert(&rec(&format!("d{i}"), T0 + i));
    }
    let mut seen = Vec::new();
    reg.for_each(|r| seen.push(r.issued_at.0 - T0));
    seen.sort_unstable();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
}

/// Insert, replace and remove many times against a model; the records'
/// allocations are created and freed all along (this is the test to run
/// under Miri).
#[test]
fn heavy_churn_matches_a_model() {
    let n_ops = if cfg!(miri) { 600 } else { 20_000 };
    let reg = Registry::new();
    let mut model: HashMap<String, DeviceRecord> = HashMap::new();
    let mut x = 0x1234_5678_u64;
    let th = Thresholds::default();
    for _ in 0..n_ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = match x % 3 {
            0 => format!("{:08x}-0000-4000-8000-{:012x}", x % 97, x % 5),
            1 => format!("{:08X}-0000-4000-8000-{:012X}", x % 97, x % 5),
            _ => format!("raw-{}", x % 97),
        };
        if (x >> 8).is_multiple_of(4) {
            assert_eq!(reg.remove(&id), model.remove(&id).is_some());
        } else {
            let mut r = rec(&id, T0 - ((x >> 16) % (40 * 86_400 / 60)) as u32 * 60);
            if (x >> 40).is_multiple_of(7) {
                r.dead = dead(T0);
            }
            match (x >> 48) % 16 {
                0 => r.refresh = refresh(RefreshState::Pending, x >> 50),
                1 => r.refresh = refresh(RefreshState::Unreachable, x >> 50),
                _ => {}
            }
            if (x >> 44).is_multiple_of(2) {
                r.channel_uri = uri(&format!("https://bn2.notify.windows.com/x?t={x}+y"));
            }
            assert_eq!(
                reg.upsert(&r),
                model.insert(id.clone(), r.clone()).is_none()
            );
        }
        assert_eq!(reg.get(&id).as_ref(), model.get(&id));
        assert_eq!(reg.len(), model.len());
    }
    for (id, r) in &model {
        assert_eq!(reg.get(id).as_ref(), Some(r));
    }
    // issued_at values are whole minutes, so the counts are exact.
    for now in [T0, T0 + 16 * DAY, T0 + 40 * DAY] {
        assert_eq!(
            reg.state_counts(&th, UnixTime(now)),
            brute_counts(&reg, &th, UnixTime(now))
        );
    }
    // The issued-at index holds one entry per device, and a range reads
    // exactly the devices issued in it.
    assert_eq!(reg.issued_len(), model.len());
    for (from, to) in [
        (0, u32::MAX),
        (T0 - 20 * DAY, T0 - 10 * DAY),
        (T0 - 61, T0 - 59),
    ] {
        assert_eq!(
            issued_ids(&reg, from, to, 7),
            model_ids(
                model
                    .values()
                    .filter(|r| (from..to).contains(&r.issued_at.0))
            )
        );
    }
    // A listing in small pages sees every device once, in listing order.
    let listed = list_all(&reg, 3, 5, &|_| true);
    assert_eq!(sorted(&listed), model_ids(model.values()));
    assert_listing_order(&reg, &listed);
    // The marked index holds the marked devices, and listings through it
    // are the scan's, page for page.
    let marked = model
        .values()
        .filter(|r| r.dead.is_some() || r.refresh.is_some());
    assert_eq!(reg.marked.len(), marked.clone().count());
    assert!(marked.clone().any(|r| r.refresh.is_some()));
    assert_marked_listings_match_the_scan(&reg);
}

/// The listings of marked states (dead, refresh pending, unreachable)
/// through the marked index equal the scan's, for several page sizes.
fn assert_marked_listings_match_the_scan(reg: &Registry) {
    let filters: [&dyn Fn(&Marks) -> bool; 3] = [
        &|m: &Marks| m.dead.is_some() && m.refresh.is_none(),
        &|m: &Marks| m.refresh.is_some_and(|r| r.state == RefreshState::Pending),
        &|m: &Marks| {
            m.refresh
                .is_some_and(|r| r.state == RefreshState::Unreachable)
        },
    ];
    for filter in filters {
        let scanned = list_all(reg, 1000, 1_000_000, filter);
        assert!(!scanned.is_empty());
        for limit in [1, 4, 1000] {
            assert_eq!(
                list_all_marked(reg, limit, filter),
                scanned,
                "limit {limit}"
            );
        }
    }
}

/// Every page of a listing through the marked index, as device ids.
fn list_all_marked(reg: &Registry, limit: usize, filter: &dyn Fn(&Marks) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..1_000_000 {
        let page = reg.page_marked(cursor.as_ref(), limit, filter);
        assert!(page.records.len() <= limit.max(1));
        out.extend(page.records.into_iter().map(|r| r.device_id.into_string()));
        match page.next {
            Some(c) => cursor = Some(Cursor::from_bytes(&c.to_bytes()).unwrap()),
            None => return out,
        }
    }
    panic!("the listing did not end");
}

fn issued_ids(reg: &Registry, from: u32, to: u32, batch: usize) -> Vec<String> {
    let mut pages = reg.issued_between(UnixTime(from), UnixTime(to), batch);
    let mut out = Vec::new();
    while let Some(page) = pages.next_page() {
        assert!(!page.is_empty() && page.len() <= batch.max(1) * 2);
        out.extend(page.into_iter().map(|r| r.device_id.into_string()));
    }
    out.sort_unstable();
    out
}

fn model_ids<'a>(recs: impl Iterator<Item = &'a DeviceRecord>) -> Vec<String> {
    let mut v: Vec<String> = recs.map(|r| r.device_id.as_str().to_owned()).collect();
    v.sort_unstable();
    v
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut v = ids.to_vec();
    v.sort_unstable();
    v
}

/// Every page of a listing, in order, as device ids.
fn list_all(
    reg: &Registry,
    limit: usize,
    budget: usize,
    filter: &dyn Fn(&Marks) -> bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..1_000_000 {
        let page = reg.page(cursor.as_ref(), limit, budget, filter);
        assert!(page.records.len() <= limit.max(1));
        out.extend(page.records.into_iter().map(|r| r.device_id.into_string()));
        match page.next {
            // Cursors survive the trip through bytes (the API's form).
            Some(c) => cursor = Some(Cursor::from_bytes(&c.to_bytes()).unwrap()),
            None => return out,
        }
    }
    panic!("the listing did not end");
}

/// Listing order: by partition, then by encoded id.
fn assert_listing_order(reg: &Registry, ids: &[String]) {
    let p = reg.partitioning();
    let order = |id: &String| {
        (
            p.of(id),
            KeyBuf::encode(id).unwrap().as_key().as_bytes().to_vec(),
        )
    };
    assert!(
        ids.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "out of order"
    );
}

#[test]
fn listings_filter_and_stop_at_limit_or_budget() {
    let reg = Registry::with_partitions(Partitioning::new(8).unwrap(), 0);
    for i in 0..200 {
        let mut r = rec(&format!("dev-{i:03}"), T0 + i);
        if i % 4 == 0 {
            r.dead = dead(T0);
        }
        reg.upsert(&r);
    }
    let all = list_all(&reg, 1000, 1_000_000, &|_| true);
    assert_eq!(all.len(), 200);
    assert_listing_order(&reg, &all);
    // One page when nothing stops it.
    let page = reg.page(None, 1000, 1_000_000, &|_| true);
    assert_eq!((page.records.len(), page.next), (200, None));
    // A filter drops what fails it, in every page size.
    let dead_only = |m: &Marks| m.dead.is_some();
    for (limit, budget) in [(1, 1), (3, 10), (7, 1000), (1000, 1)] {
        let listed = list_all(&reg, limit, budget, &dead_only);
        assert_eq!(listed.len(), 50, "limit {limit} budget {budget}");
        assert!(listed
            .iter()
            .all(|id| id[4..].parse::<u32>().unwrap() % 4 == 0));
    }
    // A budget of one record still moves on a whole partition per page.
    let page = reg.page(None, 1000, 1, &|_| false);
    assert!(page.records.is_empty());
    let next = page.next.unwrap();
    assert_eq!(next.to_bytes(), [0, 1]);
    // A cursor past the last partition ends the listing.
    let end = Cursor::from_bytes(&[0, 8]).unwrap();
    let page = reg.page(Some(&end), 10, 10, &|_| true);
    assert!(page.records.is_empty() && page.next.is_none());
}

#[test]
fn a_listing_sees_every_device_that_stayed_exactly_once() {
    let reg = Registry::with_partitions(Partitioning::new(16).unwrap(), 0);
    for i in 0..300 {
        reg.upsert(&rec(&format!("stay-{i}"), T0));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<Cursor> = None;
    let mut round = 0;
    loop {
        let page = reg.page(cursor.as_ref(), 7, 20, &|_| true);
        seen.extend(page.records.into_iter().map(|r| r.device_id.into_string()));
        // Between pages, devices come and go, and some re-register.
        reg.upsert(&rec(&format!("new-{round}"), T0));
        reg.remove(&format!("new-{}", round / 2));
        reg.upsert(&rec(&format!("stay-{}", round % 300), T0 + 60 * round));
        round += 1;
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let stayed: Vec<&String> = seen.iter().filter(|id| id.starts_with("stay-")).collect();
    assert_eq!(stayed.len(), 300);
    assert_eq!(
        stayed
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        300
    );
}

#[test]
fn the_issued_index_follows_re_registrations_and_removals() {
    let reg = Registry::new();
    for i in 0..100u32 {
        reg.upsert(&rec(&format!("d{i}"), T0 + i * 30));
    }
    // Seconds count, not only minutes: [T0 + 30, T0 + 90) holds d1 and d2.
    assert_eq!(issued_ids(&reg, T0 + 30, T0 + 90, 1), ["d1", "d2"]);
    // Re-registered out of the range, removed, or marked dead: the index
    // follows the issue time only.
    reg.upsert(&rec("d1", T0 + 10 * DAY));
    reg.remove("d2");
    let mut d3 = rec("d3", T0 + 90);
    d3.dead = dead(T0 + 100);
    reg.upsert(&d3);
    assert_eq!(issued_ids(&reg, T0 + 30, T0 + 120, 1), ["d3"]);
    assert_eq!(
        issued_ids(&reg, T0 + 10 * DAY, T0 + 10 * DAY + 1, 5),
        ["d1"]
    );
    assert_eq!(reg.issued_len(), 99);
    // An empty or reversed range reads nothing.
    assert!(issued_ids(&reg, T0, T0, 4).is_empty());
    assert!(issued_ids(&reg, T0 + 5, T0, 4).is_empty());
}

#[test]
fn two_threads_on_overlapping_keys_end_consistent() {
    let (per_thread, keys) = if cfg!(miri) { (200, 16) } else { (50_000, 500) };
    let reg = Registry::new();
    let th = Thresholds::default();
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let reg = &reg;
            s.spawn(move || {
                let mut x = 0x9e37_79b9_u64 + t;
                for _ in 0..per_thread {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let id = format!("dev-{}", x % keys);
                    if x.is_multiple_of(3) {
                        reg.remove(&id);
                    } else {
                        // Whole minutes spread over 40 days: exact counts.
                        let mut r = rec(&id, T0 - ((x >> 20) % 57_600) as u32 * 60);
                        if (x >> 50).is_multiple_of(5) {
                            r.dead = dead(T0);
                        }
                        reg.upsert(&r);
                    }
                }
            });
        }
    });
    let present = (0..keys)
        .filter(|k| reg.get(&format!("dev-{k}")).is_some())
        .count();
    assert_eq!(reg.len(), present);
    for now in [T0, T0 + 20 * DAY, T0 + 50 * DAY] {
        let counts = reg.state_counts(&th, UnixTime(now));
        assert_eq!(counts.iter().sum::<u64>(), present as u64);
        assert_eq!(counts, brute_counts(&reg, &th, UnixTime(now)));
    }
}

// --- properties -------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 8 } else { 256 },
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_field_round_trips(r in record()) {
        let reg = Registry::new();
        prop_assert!(reg.upsert(&r));
        prop_assert_eq!(reg.get(r.device_id.as_str()), Some(r.clone()));
        let codec = RecordCodec::new();
        let c = codec.encode(&r);
        prop_assert_eq!(c.issued_at(), r.issued_at);
        prop_assert_eq!(c.dead(), r.dead);
        prop_assert_eq!(codec.decode(&c), Some(r));
    }

    #[test]
    fn uris_round_trip_byte_exact(u in prop_oneof![channel_uri(), trusted_uri()]) {
        let reg = Registry::new();
        let mut r = rec("d", T0);
        r.channel_uri = u.clone();
        reg.upsert(&r);
        let back = reg.get("d").unwrap().channel_uri;
        prop_assert_eq!(back.as_str().as_bytes(), u.as_str().as_bytes());
        prop_assert_eq!(back, u);
    }

    #[test]
    fn replace_keeps_only_the_last(rs in proptest::collection::vec(record(), 1..20)) {
        let reg = Registry::new();
        let mut model = HashMap::new();
        for r in &rs {
            prop_assert_eq!(
                reg.upsert(r),
                model.insert(r.device_id.clone(), r.clone()).is_none()
            );
        }
        prop_assert_eq!(reg.len(), model.len());
        for (id, r) in &model {
            prop_assert_eq!(reg.get(id.as_str()), Some(r.clone()));
        }
    }

    /// Counts are exact for every record whose minute does not straddle a
    /// threshold; such records are left out of the fleet here.
    #[test]
    fn state_counts_are_exact_away_from_minute_boundaries(
        issued in proptest::collection::vec((0u32..60 * DAY, 0u8..20), 0..200),
        due in 1u32..20 * DAY,
        extra in 0u32..20 * DAY,
        now_off in 0u32..60 * DAY,
    ) {
        let th = Thresholds { renewal_due_after: due, expire_after: due + extra };
        let now = T0 + now_off;
        let cuts = [now.saturating_sub(due) / 60, now.saturating_sub(due + extra) / 60];
        let reg = Registry::new();
        for (i, &(off, d)) in issued.iter().enumerate() {
            let at = T0 + off - 30 * DAY;
            if cuts.contains(&(at / 60)) {
                continue;
            }
            let mut r = rec(&format!("dev-{i}"), at);
            if d == 0 {
                r.dead = dead(at);
            }
            reg.upsert(&r);
        }
        prop_assert_eq!(
            reg.state_counts(&th, UnixTime(now)),
            brute_counts(&reg, &th, UnixTime(now))
        );
    }
}

#[test]
fn last_push_is_kept_in_place_and_survives_marks_but_not_a_new_channel() {
    use super::LastPush;
    let reg = Registry::new();
    assert!(!reg.record_push(
        "nobody",
        LastPush {
            at: UnixTime(1),
            result: 0,
            outcome: 0,
            status: 200
        }
    ));
    let r = rec("dev-1", 1_000);
    reg.upsert(&r);
    assert_eq!(reg.last_push("dev-1"), None);
    let p = LastPush {
        at: UnixTime(u32::MAX),
        result: 3,
        outcome: 254,
        status: 410,
    };
    assert!(reg.record_push("dev-1", p));
    assert_eq!(reg.last_push("dev-1"), Some(p));
    // A push at time 0 with result 0 is still a push.
    let zero = LastPush {
        at: UnixTime(0),
        result: 0,
        outcome: 0,
        status: 0,
    };
    reg.record_push("dev-1", zero);
    assert_eq!(reg.last_push("dev-1"), Some(zero));
    reg.record_push("dev-1", p);
    // A dead mark on the same channel life keeps it.
    let mut dead_rec = r.clone();
    dead_rec.dead = dead(2_000);
    reg.upsert(&dead_rec);
    assert_eq!(reg.last_push("dev-1"), Some(p));
    assert_eq!(reg.get("dev-1"), Some(dead_rec));
    // A new channel (a new issue time) starts without one.
    reg.upsert(&rec("dev-1", 5_000));
    assert_eq!(reg.last_push("dev-1"), None);
}

#[test]
fn record_pushes_records_each_present_device_as_record_push_would() {
    use super::LastPush;
    // UUID ids and free-form ids, in every map shard, with some absent
    // and one listed twice (the later entry wins, as with two calls).
    let reg = Registry::new();
    let ids: Vec<String> = (0..3000)
        .map(|i| {
            if i % 3 == 0 {
                format!("device-{i}")
            } else {
                format!("{:08x}-0000-4000-8000-{:012x}", i * 7919, i)
            }
        })
        .collect();
    for id in ids.iter().step_by(2) {
        reg.upsert(&rec(id, 1_000));
    }
    let push = |i: usize| LastPush {
        at: UnixTime(T0 + i as u32),
        result: (i % 20) as u8,
        outcome: (i % 13) as u8,
        status: 200 + (i % 300) as u16,
    };
    let mut batch: Vec<(DeviceKey, LastPush)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (reg.key(id).unwrap(), push(i)))
        .collect();
    batch.push((reg.key(&ids[0]).unwrap(), push(9_999)));
    assert_eq!(reg.record_pushes(&batch), 1_500 + 1);
    for (i, id) in ids.iter().enumerate() {
        let expected = match i {
            0 => Some(push(9_999)),
            i if i % 2 == 0 => Some(push(i)),
            _ => None,
        };
        assert_eq!(reg.last_push(id), expected, "device {id}");
    }
    assert_eq!(reg.len(), 1_500, "no device was added");
    assert_eq!(reg.record_pushes(&[]), 0);
}

/// Loading a snapshot's partitions gives the same registry as the records
/// upserted one by one: counts, issued-at index, and a device listed twice
/// (which no snapshot the registry cut holds) kept once, as its last copy.
#[test]
fn restored_partitions_match_upserts() {
    use crate::store::{Restore, SnapshotSource};
    let p = Partitioning::new(4).unwrap();
    let src = Registry::with_partitions(p, 0);
    for i in 0..300u32 {
        let mut r = rec(&format!("dev-{i}"), T0 - i * 3_600);
        if i % 7 == 0 {
            r.dead = dead(T0);
        }
        // dev-5 is loaded twice, first marked, then not (below).
        match i % 11 {
            0 | 5 => r.refresh = refresh(RefreshState::Pending, u64::from(i)),
            1 => r.refresh = refresh(RefreshState::Unreachable, u64::from(i)),
            _ => {}
        }
        src.upsert(&r);
    }
    let dst = Registry::with_partitions(p, 0);
    dst.seed(&src.dictionary()).unwrap();
    let twice = rec("dev-5", T0 + 600);
    for part in 0..4u16 {
        let mut bytes = Vec::new();
        let mut n = src.encoded_partition(part, &mut bytes);
        if part == p.of("dev-5") {
            let one = Registry::with_partitions(p, 0);
            one.upsert(&twice);
            n += one.encoded_partition(part, &mut bytes);
        }
        dst.restore_partition(part, &bytes, n).unwrap();
    }
    dst.snapshot_restored();
    src.upsert(&twice);
    assert_eq!(dst.len(), 300);
    assert_eq!(dst.issued_len(), 300);
    assert_eq!(dst.get("dev-5"), Some(twice.clone()));
    let th = Thresholds::default();
    for now in [T0, T0 + 20 * DAY] {
        assert_eq!(
            dst.state_counts(&th, UnixTime(now)),
            src.state_counts(&th, UnixTime(now))
        );
        assert_eq!(
            dst.state_counts(&th, UnixTime(now)),
            brute_counts(&dst, &th, UnixTime(now))
        );
    }
    for (from, to) in [(0, u32::MAX), (T0 - 2 * DAY, T0), (T0, T0 + 3_600)] {
        assert_eq!(
            issued_ids(&dst, from, to, 16),
            issued_ids(&src, from, to, 16)
        );
    }
    assert_eq!(issued_ids(&dst, T0 + 1, T0 + 3_600, 16), ["dev-5"]);
    // dev-5 was loaded marked, then unmarked: the marked index follows,
    // and lists what the source lists.
    assert_eq!(dst.marked.len(), src.marked.len());
    assert_marked_listings_match_the_scan(&dst);
    let pending = |m: &Marks| m.refresh.is_some();
    let listed = list_all_marked(&dst, 5, &pending);
    assert_eq!(listed, list_all_marked(&src, 5, &pending));
    assert!(!listed.contains(&"dev-5".to_owned()));
    // Replay after the load moves devices as an upsert does.
    dst.upsert(&rec("dev-5", T0 - 10 * DAY));
    assert_eq!(
        issued_ids(&dst, T0 + 1, T0 + 3_600, 16),
        Vec::<String>::new()
    );
    assert_eq!(dst.issued_len(), 300);
}
