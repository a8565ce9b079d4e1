//! What in-process tests of the services share: a real registry, store,
//! committer and lifecycle on a temporary directory.

use crate::config::{Config, Settings};
use crate::core::{
    ChannelUri, DeadMark, DeadReason, DeviceId, DeviceRecord, Pfn, ProviderId, RefreshMark,
    RefreshState, Registration, UnixTime, UriPolicy,
};
use crate::lifecycle::Lifecycle;
use crate::registry::Registry;
use crate::store::committer::{CommitHandle, Committer, CommitterConfig, CommitterJoin};
use crate::store::fjall_store::{FjallOptions, FjallStore};
use crate::store::{Mutation, Store};
use proptest::prelude::*;
use std::sync::Arc;

/// The PFN of the one configured app.
pub(crate) const PFN: &str = "Contoso.MDM_8wekyb3d8bbwe";

/// The services below the API, on a temporary directory.
pub(crate) struct Services {
    pub(crate) settings: Settings,
    pub(crate) registry: Arc<Registry>,
    pub(crate) commits: CommitHandle,
    pub(crate) lifecycle: Arc<Lifecycle>,
    _committer: CommitterJoin,
    _dir: tempfile::TempDir,
}

impl Services {
    pub(crate) fn new() -> Services {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(FjallStore::open(dir.path(), FjallOptions::default()).unwrap());
        let registry = Arc::new(Registry::new());
        let (reg, lookup) = (registry.clone(), registry.clone());
        let (commits, committer) = Committer::start_with_lookup(
            store.clone(),
            Box::new(move |batch: &[Mutation]| crate::server::apply_to_registry(&reg, batch)),
            Box::new(move |id| lookup.get(id.as_str()).map(|r| r.channel_uri)),
            CommitterConfig::default(),
        );
        let settings = Settings::resolve(&Config::default()).unwrap();
        let lifecycle = Arc::new(Lifecycle::new(
            settings.refresh.clone(),
            settings.thresholds,
            vec![Pfn::parse(PFN).unwrap()],
            registry.clone(),
            store.clone(),
            commits.clone(),
        ));
        Services {
            settings,
            registry,
            commits,
            lifecycle,
            _committer: committer,
            _dir: dir,
        }
    }
}

/// A registration of `id` with a channel token, issued when registered.
pub(crate) fn registration(id: &str, token: &str) -> Registration {
    Registration {
        device_id: DeviceId::parse(id).unwrap(),
        pfn: Pfn::parse(PFN).unwrap(),
        channel_uri: ChannelUri::parse(
            &format!("https://db5.notify.windows.com/?token={token}"),
            &UriPolicy::default(),
        )
        .unwrap(),
        provider_id: None,
        issued_at: None,
    }
}

/// Any valid device record.
pub(crate) fn arb_record() -> impl Strategy<Value = DeviceRecord> {
    (
        "[!-~&&[^/?#%\\\\\"']]{1,128}",
        "[A-Za-z0-9.-]{3,50}_[a-z0-9]{13}",
        "https://[a-z0-9.-]{1,40}/[!-~]{0,400}",
        proptest::option::of("[A-Za-z0-9._-]{1,64}"),
        any::<u32>(),
        proptest::option::of((1u8..=3, any::<u32>())),
        proptest::option::of((1u8..=2, any::<u32>(), any::<u64>())),
    )
        .prop_map(
            |(id, pfn, uri, provider, issued, dead, refresh)| DeviceRecord {
                device_id: DeviceId::parse_stored(&id).unwrap(),
                pfn: Pfn::parse(&pfn).unwrap(),
                channel_uri: ChannelUri::from_trusted(uri).unwrap(),
                provider_id: provider.map(|p| ProviderId::parse(&p).unwrap()),
                issued_at: UnixTime(issued),
                dead: dead.map(|(c, at)| DeadMark {
                    reason: DeadReason::from_code(c).unwrap(),
                    at: UnixTime(at),
                }),
                refresh: refresh.map(|(c, since, job)| RefreshMark {
                    state: RefreshState::from_code(c).unwrap(),
                    since: UnixTime(since),
                    job,
                }),
            },
        )
}

/// A small tmpfs mounted on a fresh temporary directory, for tests of a
/// full disk; unmounted when dropped, passed or not.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it); `None`,
    /// after saying the test is skipped, where that needs root and the
    /// tests do not run as root (CI does).
    pub(crate) fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (not root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
