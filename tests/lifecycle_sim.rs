//! Deterministic simulation of the channel lifecycle and the refresh queue
//! over 90 virtual days, using only `wnsgate::core`.
//!
//! A fleet of 100,000 devices with different behaviours (renew on time, fail
//! to renew, powered off for 40 days, check in often, never come back), a
//! simulated WNS that answers 410 for dead channels, the gateway's own
//! expiry sweep and an MDM server that leases jobs every hour. The test plays
//! the part of the server around the core: it keeps the device states, the
//! expiry index and a store rebuilt only from the queue's [`Change`]s, and
//! checks after every step that nothing was lost or duplicated.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use wnsgate::core::{
    Change, CompleteOutcome, DeviceId, Handout, Job, JobId, LeaveReason, Pfn, RefreshPolicy,
    RefreshQueue, Thresholds, UnixTime,
};

const DEVICES: u32 = 100_000;
const DAYS: u32 = 90;
const HOUR: u32 = 3_600;
const DAY: u32 = 86_400;
const STEP: u32 = HOUR;
const T0: u32 = 1_800_000_000;
/// Probability that a new channel is revoked by WNS before it expires.
const REVOKE_P: f64 = 0.02;
/// Share of the fleet woken each day.
const WAKE_P: f64 = 0.10;
/// Invariants over the whole fleet are checked this often.
const FULL_CHECK_EVERY: u32 = 10 * DAY;

/// A small seeded generator (SplitMix64): reproducible runs, and cheap
/// enough for millions of draws in a debug build.
struct SimRng(u64);

impl SimRng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), with a negligible modulo bias.
    fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n)) as u32
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Behaviour {
    /// Renews at day 15 of every channel, never otherwise seen.
    RenewsOnTime,
    /// Never renews (its channel expires at 30 days); checks in every few
    /// hours, so its refresh job goes out at check-in.
    FailsRenewal,
    /// Renews on time, polls daily, but is off for 40 days at some point.
    PoweredOff,
    /// Renews on time and checks in every few hours.
    ChecksInOften,
    /// Renews on time until it disappears for good.
    NeverComesBack,
}

/// What the gateway believes about a device's channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gw {
    /// Channel believed alive (active or renewal due): in the expiry index.
    Alive,
    /// Channel dead (by age or by WNS): a refresh job is open.
    Dead,
    /// Refresh given up.
    Unreachable,
}

struct Device {
    id: DeviceId,
    behaviour: Behaviour,
    /// Offline during [off_from, off_until).
    off_from: u32,
    off_until: u32,
    /// The channel the gateway holds.
    issued_at: u32,
    revoked_at: u32,
    generation: u32,
    gw: Gw,
    /// Why and when the gateway last saw the channel die.
    death: (LeaveReason, u32),
    /// The device ran a PFN replacement; its new URI is read next session.
    uri_waiting: bool,
    /// The MDM server queued the replacement command for the next session.
    command_queued: bool,
    sessions_since_death: u32,
}

impl Device {
    fn online(&self, t: u32) -> bool {
        !(self.off_from <= t && t < self.off_until)
    }

    fn renews(&self) -> bool {
        self.behaviour != Behaviour::FailsRenewal
    }

    /// The session interval, for devices that poll.
    fn poll_every(&self) -> Option<(u32, u32)> {
        match self.behaviour {
            Behaviour::FailsRenewal => Some((10 * HOUR, 2 * HOUR)),
            Behaviour::ChecksInOften => Some((6 * HOUR, HOUR)),
            Behaviour::PoweredOff => Some((DAY, 4 * HOUR)),
            Behaviour::RenewsOnTime | Behaviour::NeverComesBack => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Renew { generation: u32 },
    Session,
}

#[derive(Default, Debug)]
struct Counts {
    opened_age: u64,
    opened_410: u64,
    reopened_at_check_in: u64,
    handed_at_check_in: u64,
    rehanded_without_change: u64,
    leased: u64,
    completed_delivered: u64,
    completed_failed: u64,
    leases_abandoned: u64,
    closed: u64,
    gave_up: u64,
    registrations: u64,
    wakes: u64,
    sessions: u64,
    max_open: usize,
    max_leased: u64,
}

struct World {
    rng: SimRng,
    th: Thresholds,
    queue: RefreshQueue,
    devices: Vec<Device>,
    index: HashMap<String, u32>,
    /// Expiry index of channels believed alive: (expires_at, device).
    expiry: BTreeSet<(u32, u32)>,
    events: BinaryHeap<Reverse<(u32, u32, Event)>>,
    /// The store, rebuilt from the queue's changes only.
    store: HashMap<JobId, Job>,
    finished_ids: HashSet<JobId>,
    pfn: Pfn,
    n: Counts,
}

impl World {
    fn new(seed: u64) -> World {
        let policy = RefreshPolicy {
            jobs_per_second: 500,
            max_outstanding: 2_000,
            ..RefreshPolicy::default()
        };
        let mut w = World {
            rng: SimRng(seed),
            th: Thresholds::default(),
            queue: RefreshQueue::new(policy),
            devices: Vec::with_capacity(DEVICES as usize),
            index: HashMap::with_capacity(DEVICES as usize),
            expiry: BTreeSet::new(),
            events: BinaryHeap::new(),
            store: HashMap::new(),
            finished_ids: HashSet::new(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").expect("valid pfn"),
            n: Counts::default(),
        };
        for i in 0..DEVICES {
            let behaviour = match w.rng.below(100) {
                0..70 => Behaviour::RenewsOnTime,
                70..75 => Behaviour::FailsRenewal,
                75..87 => Behaviour::PoweredOff,
                87..90 => Behaviour::ChecksInOften,
                _ => Behaviour::NeverComesBack,
            };
            let (off_from, off_until) = match behaviour {
                Behaviour::PoweredOff => {
                    let from = T0 + w.rng.below(30 * DAY);
                    (from, from + 40 * DAY)
                }
                Behaviour::NeverComesBack => (T0 + w.rng.below(30 * DAY), u32::MAX),
                _ => (u32::MAX, u32::MAX),
            };
            let id = DeviceId::parse(&format!("dev-{i:06}")).expect("valid id");
            w.index.insert(id.as_str().to_owned(), i);
            w.devices.push(Device {
                id,
                behaviour,
                off_from,
                off_until,
                issued_at: 0,
                revoked_at: u32::MAX,
                generation: 0,
                gw: Gw::Alive,
                death: (LeaveReason::Age, 0),
                uri_waiting: false,
                command_queued: false,
                sessions_since_death: 0,
            });
            // A fleet of mixed ages; devices that renew are never past 15 days.
            let age = match behaviour {
                Behaviour::FailsRenewal => w.rng.below(30 * DAY),
                _ => w.rng.below(15 * DAY),
            };
            w.new_channel(i, T0 - age);
            if let Some((every, spread)) = w.devices[i as usize].poll_every() {
                let first = T0 + w.rng.below(every + spread);
                w.events.push(Reverse((first, i, Event::Session)));
            }
        }
        w
    }

    fn apply(&mut self, c: Change) {
        match c {
            Change::Put(job) => {
                assert!(
                    !self.finished_ids.contains(&job.id),
                    "job {} came back after it was finished",
                    job.id
                );
                self.store.insert(job.id, job);
            }
            Change::Closed { id, .. } => {
                assert!(self.store.remove(&id).is_some(), "closed an unknown job");
                assert!(self.finished_ids.insert(id));
                self.n.closed += 1;
            }
            Change::GaveUp { id, device_id } => {
                assert!(self.store.remove(&id).is_some(), "gave up an unknown job");
                assert!(self.finished_ids.insert(id));
                let d = self.index[device_id.as_str()];
                let dev = &mut self.devices[d as usize];
                assert_eq!(dev.gw, Gw::Dead);
                dev.gw = Gw::Unreachable;
                self.n.gave_up += 1;
            }
        }
    }

    /// The device got a new channel and the gateway learned it at `t`.
    fn new_channel(&mut self, d: u32, t: u32) {
        let revoked = if self.rng.chance(REVOKE_P) {
            t + self.rng.below(self.th.expire_after)
        } else {
            u32::MAX
        };
        let renew_jitter = self.rng.below(4 * HOUR);
        let dev = &mut self.devices[d as usize];
        if dev.gw == Gw::Alive && dev.generation > 0 {
            let old = self.th.expires_at(UnixTime(dev.issued_at)).0;
            assert!(self.expiry.remove(&(old, d)));
        }
        dev.generation += 1;
        dev.issued_at = t;
        dev.revoked_at = revoked;
        dev.gw = Gw::Alive;
        dev.uri_waiting = false;
        dev.sessions_since_death = 0;
        self.expiry.insert((self.th.expires_at(UnixTime(t)).0, d));
        if dev.renews() {
            let at = self.th.renewal_due_at(UnixTime(t)).0 + renew_jitter;
            let generation = dev.generation;
            self.events
                .push(Reverse((at, d, Event::Renew { generation })));
        }
        self.n.registrations += 1;
        let name = self.devices[d as usize].id.as_str().to_owned();
        if let Some(c) = self.queue.registered(&name, UnixTime(t)) {
            assert!(matches!(c, Change::Closed { .. }));
            self.apply(c);
        }
    }

    /// The gateway learned that device `d`'s channel is dead.
    fn channel_died(&mut self, d: u32, reason: LeaveReason, expired_at: u32, now: u32) {
        let dev = &mut self.devices[d as usize];
        assert_eq!(dev.gw, Gw::Alive);
        dev.gw = Gw::Dead;
        dev.death = (reason, expired_at);
        dev.sessions_since_death = 0;
        let id = dev.id.clone();
        match reason {
            LeaveReason::Age => self.n.opened_age += 1,
            _ => self.n.opened_410 += 1,
        }
        let c = self
            .queue
            .open(
                id,
                self.pfn.clone(),
                None,
                reason,
                UnixTime(expired_at),
                UnixTime(now),
            )
            .expect("a device with a live channel has no open job");
        self.apply(c);
    }

    /// The device opened an OMA-DM session at `t`.
    fn session(&mut self, d: u32, t: u32) {
        self.n.sessions += 1;
        let dev = &mut self.devices[d as usize];
        if dev.gw != Gw::Alive {
            dev.sessions_since_death += 1;
        }
        if dev.uri_waiting {
            // The MDM server reads the URI registered after the last
            // replacement.
            self.new_channel(d, t);
        }
        let dev = &mut self.devices[d as usize];
        if dev.command_queued {
            dev.command_queued = false;
            self.ran_replacement(d, t);
        }
        let dev = &mut self.devices[d as usize];
        if dev.gw == Gw::Unreachable {
            // The integration reopens a job for a given-up device that shows
            // up again: it is in a session now, worth one more try.
            let (reason, at) = dev.death;
            dev.gw = Gw::Dead;
            let c = self
                .queue
                .open(
                    dev.id.clone(),
                    self.pfn.clone(),
                    None,
                    reason,
                    UnixTime(at),
                    UnixTime(t),
                )
                .expect("an unreachable device has no open job");
            self.apply(c);
            self.n.reopened_at_check_in += 1;
        }
        let name = self.devices[d as usize].id.as_str();
        if let Some((job, change)) = self.queue.check_in(name, UnixTime(t)) {
            assert_eq!(&job.device_id, &self.devices[d as usize].id);
            match change {
                Some(c) => {
                    self.n.handed_at_check_in += 1;
                    self.apply(c);
                }
                None => self.n.rehanded_without_change += 1,
            }
            self.ran_replacement(d, t);
        }
    }

    /// The device ran the PFN replacement: it registers with WNS and the
    /// MDM server reads the new URI now or in the next session.
    fn ran_replacement(&mut self, d: u32, t: u32) {
        if self.rng.chance(0.5) {
            self.new_channel(d, t);
        } else {
            self.devices[d as usize].uri_waiting = true;
        }
    }

    fn run_events_until(&mut self, until: u32) {
        while let Some(&Reverse((t, d, ev))) = self.events.peek() {
            if t > until {
                break;
            }
            self.events.pop();
            let dev = &self.devices[d as usize];
            let online = dev.online(t);
            match ev {
                Event::Renew { generation } => {
                    if generation == dev.generation && online {
                        // Renewal succeeded; the device checks in and the
                        // MDM server reads the new URI.
                        self.new_channel(d, t);
                    }
                }
                Event::Session => {
                    let Some((every, spread)) = dev.poll_every() else {
                        continue;
                    };
                    let (off_until, poll) = (dev.off_until, online);
                    if poll {
                        self.session(d, t);
                    }
                    let next = if poll {
                        t + every - spread + self.rng.below(2 * spread)
                    } else {
                        off_until
                    };
                    if next != u32::MAX {
                        self.events.push(Reverse((next, d, Event::Session)));
                    }
                }
            }
        }
    }

    /// The gateway's sweep of the expiry index: channels past 30 days.
    fn sweep(&mut self, now: u32) {
        while let Some(&(at, d)) = self.expiry.first() {
            if at > now {
                break;
            }
            self.expiry.pop_first();
            self.channel_died(d, LeaveReason::Age, at, now);
        }
    }

    /// A daily wake of part of the fleet; WNS answers 410 for dead channels.
    fn wake(&mut self, now: u32) {
        let wakes = (f64::from(DEVICES) * WAKE_P) as u32;
        for _ in 0..wakes {
            let d = self.rng.below(DEVICES);
            let dev = &self.devices[d as usize];
            if dev.gw != Gw::Alive {
                continue; // the gateway never pushes to a dead channel
            }
            self.n.wakes += 1;
            let age_dead = now >= self.th.expires_at(UnixTime(dev.issued_at)).0;
            assert!(!age_dead, "the sweep runs before the wake");
            if now >= dev.revoked_at {
                let old = self.th.expires_at(UnixTime(dev.issued_at)).0;
                assert!(self.expiry.remove(&(old, d)));
                self.channel_died(d, LeaveReason::Wns410, now, now);
            } else if dev.online(now) {
                self.session(d, now);
            }
        }
    }

    /// The MDM server's hourly lease; it reports most jobs, loses some.
    fn mdm_lease(&mut self, now: u32) {
        let (jobs, changes) = self.queue.lease(1_000, Some(HOUR), UnixTime(now));
        for c in changes {
            self.apply(c);
        }
        self.n.leased += jobs.len() as u64;
        self.n.max_leased = self
            .n
            .max_leased
            .max(self.queue.stats(UnixTime(now)).leased);
        assert!(self.queue.stats(UnixTime(now)).leased <= 2_000);
        for job in jobs {
            let r = self.rng.unit();
            let outcome = if r < 0.6 {
                CompleteOutcome::Delivered
            } else if r < 0.85 {
                CompleteOutcome::Failed { status: Some(3) }
            } else {
                self.n.leases_abandoned += 1;
                continue;
            };
            let c = self
                .queue
                .complete(job.id, outcome, UnixTime(now))
                .expect("a job just leased can be completed");
            if let Change::Put(ref j) = c {
                assert!(matches!(
                    j.state,
                    wnsgate::core::JobState::Queued
                        | wnsgate::core::JobState::Delivered {
                            via: Handout::Lease,
                            ..
                        }
                ));
            }
            if outcome == CompleteOutcome::Delivered {
                self.n.completed_delivered += 1;
                let d = self.index[job.device_id.as_str()];
                self.devices[d as usize].command_queued = true;
            } else {
                self.n.completed_failed += 1;
            }
            self.apply(c);
        }
    }

    fn step(&mut self, now: u32) {
        self.run_events_until(now);
        self.sweep(now);
        for c in self.queue.tick(UnixTime(now)) {
            self.apply(c);
        }
        self.mdm_lease(now);
        if (now - T0) % DAY == 12 * HOUR {
            self.wake(now);
        }
        self.n.max_open = self.n.max_open.max(self.queue.len());
        assert_eq!(self.store.len(), self.queue.len(), "store and queue agree");
    }

    /// Everything the gateway and the queue must agree on, over the fleet.
    fn check_all(&self, now: u32) {
        self.queue.check_invariants().expect("queue invariants");
        for job in self.queue.jobs() {
            assert_eq!(self.store.get(&job.id), Some(&job), "store lost a change");
        }
        for (d, dev) in self.devices.iter().enumerate() {
            let job = self.queue.job_for_device(dev.id.as_str());
            let expires = self.th.expires_at(UnixTime(dev.issued_at)).0;
            match dev.gw {
                Gw::Alive => {
                    assert!(job.is_none(), "{} alive with a job", dev.id);
                    assert!(self.expiry.contains(&(expires, d as u32)));
                    assert!(expires > now, "{} expired but not swept", dev.id);
                }
                Gw::Dead => {
                    assert!(job.is_some(), "{} dead without a job", dev.id);
                }
                Gw::Unreachable => assert!(job.is_none()),
            }
        }
        assert_eq!(
            self.expiry.len(),
            self.devices.iter().filter(|d| d.gw == Gw::Alive).count()
        );
    }
}

#[test]
fn ninety_days_of_a_fleet() {
    let mut w = World::new(0x5eed_cafe);
    let end = T0 + DAYS * DAY;
    let mut now = T0;
    w.check_all(now);
    while now < end {
        now += STEP;
        w.step(now);
        if (now - T0).is_multiple_of(FULL_CHECK_EVERY) {
            w.check_all(now);
        }
    }
    w.check_all(now);

    let opened = w.n.opened_age + w.n.opened_410 + w.n.reopened_at_check_in;
    assert_eq!(
        opened,
        w.n.closed + w.n.gave_up + w.queue.len() as u64,
        "every job opened is closed, given up or still open"
    );
    assert!(w.n.opened_age > 0 && w.n.opened_410 > 0);
    assert!(w.n.handed_at_check_in > 0 && w.n.completed_delivered > 0);
    assert!(w.n.leases_abandoned > 0 && w.n.gave_up > 0);

    let mut by_end: HashMap<(Behaviour, &'static str), u32> = HashMap::new();
    for dev in &w.devices {
        let state = match dev.gw {
            Gw::Alive => "active",
            Gw::Dead => "refresh_pending",
            Gw::Unreachable => "unreachable",
        };
        *by_end.entry((dev.behaviour, state)).or_default() += 1;
        // A device seen twice since its channel died got the command in
        // the first session and its new URI read by the second.
        if dev.gw != Gw::Alive {
            assert!(
                dev.sessions_since_death < 2,
                "{} ({:?}) had {} sessions since its channel died and is {:?}",
                dev.id,
                dev.behaviour,
                dev.sessions_since_death,
                dev.gw
            );
        }
        match dev.behaviour {
            Behaviour::NeverComesBack => assert_eq!(
                dev.gw,
                Gw::Unreachable,
                "{} never came back and must be given up",
                dev.id
            ),
            // Back from 40 days off: fixed, unless its channel died again
            // since (then the two-session rule above applies).
            Behaviour::PoweredOff => assert!(
                dev.gw == Gw::Alive || dev.death.1 >= dev.off_until,
                "{} still {:?} after coming back",
                dev.id,
                dev.gw
            ),
            // Only a revoked channel kills these early; the next renewal,
            // at most 15 days after the channel was issued, replaces it.
            Behaviour::RenewsOnTime => assert!(
                dev.gw == Gw::Alive || now - dev.issued_at < 15 * DAY + 4 * HOUR,
                "{} {:?} past its renewal",
                dev.id,
                dev.gw
            ),
            Behaviour::FailsRenewal | Behaviour::ChecksInOften => {}
        }
    }
    let mut rows: Vec<_> = by_end.into_iter().collect();
    rows.sort_by_key(|((b, s), _)| (format!("{b:?}"), *s));
    for ((b, s), n) in rows {
        println!("{b:?} ends {s}: {n}");
    }
    println!("{:#?}", w.n);
    println!("open at the end: {:?}", w.queue.stats(UnixTime(now)));
}
