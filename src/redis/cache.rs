//! Caches shared by every replica: typed values (JSON through serde) under
//! `<prefix>:cache:<name>:<key>`, each written with a TTL (extraction results 24 h and
//! deduplication handles 1 h by default, `[redis.cache]`).
//!
//! Invariants: every entry has a TTL (no write without `PX`); an entry that no longer
//! decodes (the type changed in a rolling upgrade, a foreign writer) is deleted and
//! counted as a miss, never an error; hits, misses and latency are metrics.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{RedisClient, RedisError};
use crate::config::CacheConfig;

/// A typed cache with one TTL.
#[derive(Debug)]
pub struct Cache<T> {
    client: RedisClient,
    name: String,
    ttl: Duration,
    // `fn() -> T`: the cache neither owns nor shares a `T`, so it is Send + Sync for any T.
    _values: PhantomData<fn() -> T>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            name: self.name.clone(),
            ttl: self.ttl,
            _values: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> Cache<T> {
    /// A cache `name` whose entries live for `ttl`.
    pub fn new(client: RedisClient, name: &str, ttl: Duration) -> Self {
        Self {
            client,
            name: name.to_owned(),
            ttl: ttl.max(Duration::from_millis(1)),
            _values: PhantomData,
        }
    }

    /// The extraction-results cache (`redis.cache.extraction-ttl`).
    pub fn extraction(client: RedisClient, config: &CacheConfig) -> Self {
        Self::new(client, "extraction", config.extraction_ttl)
    }

    /// The deduplication-handles cache (`redis.cache.dedup-ttl`).
    pub fn dedup(client: RedisClient, config: &CacheConfig) -> Self {
        Self::new(client, "dedup", config.dedup_ttl)
    }

    /// The TTL new entries get.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn key(&self, key: &str) -> String {
        self.client.key("cache", &format!("{}:{key}", self.name))
    }

    /// The value under `key`, if present and decodable.
    pub async fn get(&self, key: &str) -> Result<Option<T>, RedisError> {
        let started = Instant::now();
        let full_key = self.key(key);
        let mut cmd = ::redis::cmd("GET");
        cmd.arg(&full_key);
        let bytes: Option<Vec<u8>> = self.client.command("cache_get", &cmd).await?;
        let value = match bytes.map(|b| serde_json::from_slice::<T>(&b)) {
            None => None,
            Some(Ok(value)) => Some(value),
            Some(Err(error)) => {
                tracing::warn!(cache = %self.name, key, %error, "dropping an undecodable cache entry");
                crate::metrics::cache_decode_error(&self.name);
                let mut del = ::redis::cmd("DEL");
                del.arg(&full_key);
                self.client.command::<i64>("cache_del", &del).await?;
                None
            }
        };
        crate::metrics::cache_lookup(&self.name, value.is_some(), started.elapsed());
        Ok(value)
    }

    /// Stores `value` under `key` for the cache's TTL, replacing any entry.
    pub async fn put(&self, key: &str, value: &T) -> Result<(), RedisError> {
        self.write(key, value, false).await.map(|_| ())
    }

    /// Stores `value` under `key` only if no entry is there; returns whether it was stored
    /// (the first writer of a deduplication handle wins).
    pub async fn put_if_absent(&self, key: &str, value: &T) -> Result<bool, RedisError> {
        self.write(key, value, true).await
    }

    async fn write(&self, key: &str, value: &T, only_new: bool) -> Result<bool, RedisError> {
        let started = Instant::now();
        let bytes = serde_json::to_vec(value).map_err(|e| RedisError::Encode {
            op: "cache_set",
            message: e.to_string(),
        })?;
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(bytes)
            .arg("PX")
            .arg(self.ttl.as_millis().max(1) as u64);
        if only_new {
            cmd.arg("NX");
        }
        let reply: Option<String> = self.client.command("cache_set", &cmd).await?;
        crate::metrics::cache_write(&self.name, started.elapsed());
        Ok(reply.is_some())
    }

    /// Removes `key`'s entry; returns whether there was one.
    pub async fn remove(&self, key: &str) -> Result<bool, RedisError> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.key(key));
        let removed: i64 = self.client.command("cache_del", &cmd).await?;
        Ok(removed > 0)
    }

    /// Time left before `key`'s entry expires (`None` if there is no entry).
    pub async fn time_to_live(&self, key: &str) -> Result<Option<Duration>, RedisError> {
        let mut cmd = ::redis::cmd("PTTL");
        cmd.arg(self.key(key));
        let ms: i64 = self.client.command("cache_ttl", &cmd).await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }
}
