//! Bulk wakes in cluster mode: kept in the KV bucket `wnsgate-jobs`, shared
//! by every node, with the listed ids of a job as an object beside the
//! partition snapshots.
//!
//! Keys, for job `<id>`:
//! - `<id>.def`: what it was asked to do (JSON), written once;
//! - `<id>.cancel`: present once it was cancelled;
//! - `<id>.walk.<walk>`: the last checkpoint of one walk, a node's run over
//!   the partitions it owned (`<walk>` names the process and the walk).
//!
//! The listed ids are the object `bulk-<id>.ids` (one per line) in the
//! object store `wnsgate-snapshots`, written before the definition, so a
//! node that sees the definition finds them.
//!
//! Every node keeps a view of the bucket in memory, filled at start and
//! kept current by a watch: reads ([`JobBook::load`], [`JobBook::job`])
//! cost no round trip. Writes return once JetStream has them.

use crate::core::bulk::{BookError, Checkpoint, JobBook, JobDef, StoredJob};
use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The bucket.
pub const JOBS_BUCKET: &str = "wnsgate-jobs";
/// How long one request to NATS may take.
const DEADLINE: Duration = Duration::from_secs(10);

fn object_name(id: &str) -> String {
    format!("bulk-{id}.ids")
}

/// Job ids are made by the gateway; anything else is never a key.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `s` with every character a KV key cannot hold replaced.
pub fn key_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The cluster's [`JobBook`].
pub struct KvJobBook {
    handle: tokio::runtime::Handle,
    kv: kv::Store,
    objects: ObjectStore,
    view: Arc<RwLock<BTreeMap<String, Bytes>>>,
}

fn err(what: &str, e: impl std::fmt::Display) -> BookError {
    BookError(format!("{what}: {e}"))
}

impl KvJobBook {
    /// Opens (or creates) the bucket, reads it into the view and keeps the
    /// view current from then on, on `handle`'s runtime.
    pub async fn open(
        js: &jetstream::Context,
        objects: ObjectStore,
        replicas: usize,
        handle: tokio::runtime::Handle,
    ) -> Result<KvJobBook, String> {
        let kv = match js.get_key_value(JOBS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: JOBS_BUCKET.into(),
                    description: "wnsgate: bulk wakes and their checkpoints".into(),
                    history: 1,
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create the bucket {JOBS_BUCKET}: {e}"))?,
        };
        let view = Arc::new(RwLock::new(BTreeMap::new()));
        // The watch first, so nothing written meanwhile is missed; it
        // delivers each key's last value, then every change.
        let watch = kv
            .watch_with_history(">")
            .await
            .map_err(|e| format!("cannot watch the bucket {JOBS_BUCKET}: {e}"))?;
        {
            let mut keys = kv
                .keys()
                .await
                .map_err(|e| format!("cannot read the bucket {JOBS_BUCKET}: {e}"))?;
            let mut found = BTreeMap::new();
            while let Some(k) = keys.next().await {
                let k = k.map_err(|e| format!("cannot read the bucket {JOBS_BUCKET}: {e}"))?;
                if let Ok(Some(value)) = kv.get(k.as_str()).await {
                    found.insert(k, value);
                }
            }
            let mut v = view.write();
            for (k, value) in found {
                v.entry(k).or_insert(value);
            }
        }
        handle.spawn(keep_current(kv.clone(), watch, view.clone()));
        Ok(KvJobBook {
            handle,
            kv,
            objects,
            view,
        })
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, BookError> {
        self.handle
            .block_on(async { tokio::time::timeout(DEADLINE, f).await })
            .map_err(|_| BookError(format!("NATS did not answer within {DEADLINE:?}")))
    }

    fn put(&self, key: String, value: Vec<u8>) -> Result<(), BookError> {
        let value = Bytes::from(value);
        self.block_on(self.kv.put(&key, value.clone()))?
            .map_err(|e| err(&format!("cannot write {JOBS_BUCKET}/{key}"), e))?;
        // Seen at once by this node's own reads.
        self.view.write().insert(key, value);
        Ok(())
    }

    fn stored(view: &BTreeMap<String, Bytes>, id: &str) -> Option<StoredJob> {
        let def: JobDef = serde_json::from_slice(view.get(&format!("{id}.def"))?).ok()?;
        let prefix = format!("{id}.walk.");
        let walks = view
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, v)| {
                let c: Checkpoint = serde_json::from_slice(v).ok()?;
                Some((k[prefix.len()..].to_owned(), c))
            })
            .collect();
        Some(StoredJob {
            def,
            cancelled: view.contains_key(&format!("{id}.cancel")),
            walks,
        })
    }
}

/// Applies every change the watch delivers to the view; watches again
/// after a second if the watch ends.
async fn keep_current(
    kv: kv::Store,
    mut watch: kv::Watch,
    view: Arc<RwLock<BTreeMap<String, Bytes>>>,
) {
    loop {
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { break };
            let mut v = view.write();
            match entry.operation {
                kv::Operation::Put => {
                    v.insert(entry.key, entry.value);
                }
                kv::Operation::Delete | kv::Operation::Purge => {
                    v.remove(&entry.key);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        match kv.watch_with_history(">").await {
            Ok(w) => watch = w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the bulk wakes' bucket; trying again")
            }
        }
    }
}

impl JobBook for KvJobBook {
    fn create(&self, def: &JobDef, ids: &[String]) -> Result<(), BookError> {
        if !valid_id(&def.id) {
            return Err(BookError(format!("{:?} is not a job id", def.id)));
        }
        if !ids.is_empty() {
            let mut text = String::with_capacity(ids.iter().map(|i| i.len() + 1).sum());
            for id in ids {
                text.push_str(id);
                text.push('\n');
            }
            let name = object_name(&def.id);
            let mut reader = std::io::Cursor::new(text.into_bytes());
            self.block_on(self.objects.put(name.as_str(), &mut reader))?
                .map_err(|e| err(&format!("cannot write the object {name}"), e))?;
        }
        let json = serde_json::to_vec(def).map_err(|e| err("cannot encode the job", e))?;
        self.put(format!("{}.def", def.id), json)
    }

    fn checkpoint(&self, id: &str, walk: &str, checkpoint: &Checkpoint) -> Result<(), BookError> {
        if !valid_id(id) {
            return Err(BookError(format!("{id:?} is not a job id")));
        }
        let json =
            serde_json::to_vec(checkpoint).map_err(|e| err("cannot encode the checkpoint", e))?;
        self.put(format!("{id}.walk.{}", key_safe(walk)), json)
    }

    fn load(&self) -> Result<Vec<StoredJob>, BookError> {
        let view = self.view.read();
        Ok(view
            .keys()
            .filter_map(|k| k.strip_suffix(".def"))
            .filter_map(|id| Self::stored(&view, id))
            .collect())
    }

    fn ids_cancelled(&self) -> Result<Vec<(String, bool)>, BookError> {
        let view = self.view.read();
        Ok(view
            .keys()
            .filter_map(|k| k.strip_suffix(".def"))
            .map(|id| (id.to_owned(), view.contains_key(&format!("{id}.cancel"))))
            .collect())
    }

    fn job(&self, id: &str) -> Result<Option<StoredJob>, BookError> {
        Ok(Self::stored(&self.view.read(), id))
    }

    fn ids(&self, id: &str) -> Result<Vec<String>, BookError> {
        let name = object_name(id);
        let text = self
            .block_on(async {
                use tokio::io::AsyncReadExt;
                let mut object = self
                    .objects
                    .get(name.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut bytes = Vec::new();
                object
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(bytes)
            })?
            .map_err(|e| err(&format!("cannot read the object {name}"), e))?;
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    fn cancel(&self, id: &str) -> Result<(), BookError> {
        if !valid_id(id) {
            return Err(BookError(format!("{id:?} is not a job id")));
        }
        self.put(format!("{id}.cancel"), b"1".to_vec())
    }

    fn forget(&self, id: &str) -> Result<(), BookError> {
        if !valid_id(id) {
            return Err(BookError(format!("{id:?} is not a job id")));
        }
        let keys: Vec<String> = self
            .view
            .read()
            .keys()
            .filter(|k| k.strip_prefix(id).is_some_and(|rest| rest.starts_with('.')))
            .cloned()
            .collect();
        for key in keys {
            self.block_on(self.kv.purge(&key))?
                .map_err(|e| err(&format!("cannot drop {JOBS_BUCKET}/{key}"), e))?;
            self.view.write().remove(&key);
        }
        let name = object_name(id);
        // Absent for a job that listed no ids.
        let _ = self.block_on(self.objects.delete(name.as_str()));
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_names_become_key_safe() {
        assert_eq!(key_safe("gw-1.00ab"), "gw-1_00ab");
        assert_eq!(key_safe("a b/c*d>e"), "a_b_c_d_e");
    }
}
