//! The in-process log of `iotpipe dev`: partitioned, keyed, with consumer groups and commits, held
//! in memory.
//!
//! It does not outlive the process, so the embedded pipeline drains it on shutdown (stages stop
//! upstream-first, each consuming to the end). Memory is bounded: a partition holds at most
//! `capacity` records not yet committed by every group, and `append` waits for room — the
//! back-pressure then reaches ingest, which stops acknowledging, and the MQTT broker stops sending.
//! Records are dropped from the front as soon as every group committed past them; a topic nobody
//! consumes keeps its newest `capacity` records.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::log::{partition_for, Consumer, Log, LogError, LogRecord, Produce, StartAt};

/// The in-process log.
pub struct MemLog {
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    partitions: u32,
    capacity: usize,
}

struct Topic {
    parts: Vec<Mutex<Part>>,
    /// Woken on every append (consumers wait on it).
    appended: Notify,
    /// Woken on every commit (appenders waiting for room wait on it).
    space: Notify,
}

struct Part {
    /// Offset of `records[0]`.
    base: u64,
    records: VecDeque<(Bytes, Bytes)>,
    /// Committed next-offset per group.
    groups: HashMap<String, u64>,
}

impl Part {
    fn end(&self) -> u64 {
        self.base + self.records.len() as u64
    }

    fn truncate(&mut self, capacity: usize) {
        let keep_from = match self.groups.values().min() {
            Some(&min) => min,
            // Nobody consumes this topic: keep the newest `capacity` records (retention).
            None => self.end().saturating_sub(capacity as u64),
        };
        while self.base < keep_from && !self.records.is_empty() {
            self.records.pop_front();
            self.base += 1;
        }
    }
}

impl MemLog {
    /// A log whose topics have `partitions` partitions of at most `capacity` uncommitted records.
    pub fn new(partitions: u32, capacity: usize) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            partitions: partitions.max(1),
            capacity: capacity.max(1),
        }
    }

    /// Creates a topic (idempotent).
    pub fn create_topic(&self, name: &str) {
        let mut topics = self.topics.write();
        topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                parts: (0..self.partitions)
                    .map(|_| {
                        Mutex::new(Part {
                            base: 0,
                            records: VecDeque::new(),
                            groups: HashMap::new(),
                        })
                    })
                    .collect(),
                appended: Notify::new(),
                space: Notify::new(),
            })
        });
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(name.to_owned()))
    }

    /// Records in `topic` not yet committed by `group`.
    pub fn lag(&self, topic: &str, group: &str) -> Option<u64> {
        let t = self.topic(topic).ok()?;
        Some(
            t.parts
                .iter()
                .map(|p| {
                    let p = p.lock();
                    p.end() - p.groups.get(group).copied().unwrap_or(p.base)
                })
                .sum(),
        )
    }
}

#[async_trait]
impl Log for MemLog {
    async fn append(&self, topic: &str, batch: Vec<Produce>) -> Result<(), LogError> {
        let t = self.topic(topic)?;
        // Pushes the record if its partition has room; false when it is full.
        let try_push = |p: usize, rec: &Produce| -> bool {
            let mut part = t.parts[p].lock();
            part.truncate(self.capacity);
            if part.records.len() < self.capacity || part.groups.is_empty() {
                part.records.push_back((rec.key.clone(), rec.value.clone()));
                if part.groups.is_empty() {
                    // Nobody consumes this topic: apply retention right away.
                    part.truncate(self.capacity);
                }
                return true;
            }
            false
        };
        for rec in batch {
            let p = partition_for(&rec.key, self.partitions) as usize;
            while !try_push(p, &rec) {
                // Full: register for the next commit, then look again (a commit between the
                // first look and the registration would otherwise be missed), and wait. Notify
                // the consumers first, in case they are waiting for the records that fill it.
                let space = t.space.notified();
                tokio::pin!(space);
                space.as_mut().enable();
                if try_push(p, &rec) {
                    break;
                }
                t.appended.notify_waiters();
                space.await;
            }
        }
        t.appended.notify_waiters();
        Ok(())
    }

    async fn subscribe_at(
        &self,
        topic: &str,
        group: &str,
        start: StartAt,
    ) -> Result<Box<dyn Consumer>, LogError> {
        let t = self.topic(topic)?;
        let positions = t
            .parts
            .iter()
            .map(|p| {
                let mut p = p.lock();
                let at = match start {
                    StartAt::Earliest => p.base,
                    StartAt::Latest => p.end(),
                };
                *p.groups.entry(group.to_owned()).or_insert(at)
            })
            .collect();
        Ok(Box::new(MemConsumer {
            topic: t,
            group: group.to_owned(),
            positions,
            next_part: 0,
        }))
    }
}

struct MemConsumer {
    topic: Arc<Topic>,
    group: String,
    /// Next offset to read per partition (ahead of the committed offset while a batch is in flight).
    positions: Vec<u64>,
    next_part: usize,
}

impl MemConsumer {
    fn take(&mut self, max: usize) -> Vec<LogRecord> {
        let n = self.topic.parts.len();
        let mut out = Vec::new();
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let pi = (self.next_part + i) % n;
            let part = self.topic.parts[pi].lock();
            let pos = self.positions[pi].max(part.base);
            let start = usize::try_from(pos - part.base).unwrap_or(usize::MAX);
            for (j, (k, v)) in part
                .records
                .iter()
                .enumerate()
                .skip(start)
                .take(max - out.len())
            {
                out.push(LogRecord {
                    partition: u32::try_from(pi).unwrap_or(0),
                    offset: part.base + j as u64,
                    key: k.clone(),
                    value: v.clone(),
                });
            }
            self.positions[pi] = out
                .iter()
                .filter(|r| r.partition as usize == pi)
                .map(|r| r.offset + 1)
                .max()
                .unwrap_or(pos);
        }
        // Start with the next partition next time, so one busy partition cannot starve the others.
        self.next_part = (self.next_part + 1) % n;
        out
    }
}

#[async_trait]
impl Consumer for MemConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<LogRecord>, LogError> {
        let topic = Arc::clone(&self.topic);
        let notified = topic.appended.notified();
        tokio::pin!(notified);
        // Register interest before looking, so an append between the look and the wait wakes us.
        notified.as_mut().enable();
        let batch = self.take(max);
        if !batch.is_empty() || wait.is_zero() {
            return Ok(batch);
        }
        let _ = tokio::time::timeout(wait, notified).await;
        Ok(self.take(max))
    }

    async fn commit(&mut self, offsets: &[(u32, u64)]) -> Result<(), LogError> {
        for &(p, next) in offsets {
            let Some(part) = self.topic.parts.get(p as usize) else {
                continue;
            };
            let mut part = part.lock();
            let committed = part.groups.entry(self.group.clone()).or_insert(0);
            *committed = (*committed).max(next);
        }
        self.topic.space.notify_waiters();
        Ok(())
    }

    fn lag(&self) -> Option<u64> {
        Some(
            self.topic
                .parts
                .iter()
                .map(|p| {
                    let p = p.lock();
                    p.end()
                        - p.groups
                            .get(&self.group)
                            .copied()
                            .unwrap_or(p.base)
                            .max(p.base)
                })
                .sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(key: &str, v: u32) -> Produce {
        Produce {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::from(v.to_string()),
        }
    }

    #[tokio::test]
    async fn keyed_order_groups_and_commit() {
        let log = MemLog::new(4, 1000);
        log.create_topic("t");
        let mut a = log
            .subscribe("t", "a")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let mut b = log
            .subscribe("t", "b")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        log.append(
            "t",
            (0..100)
                .map(|i| produce(&format!("d{}", i % 7), i))
                .collect(),
        )
        .await
        .unwrap_or_else(|e| unreachable!("{e}"));
        let got = a
            .poll(1000, Duration::from_millis(10))
            .await
            .unwrap_or_default();
        assert_eq!(got.len(), 100);
        // Per key, values arrive in append order.
        for k in 0..7 {
            let vals: Vec<u32> = got
                .iter()
                .filter(|r| r.key == format!("d{k}").as_bytes())
                .map(|r| String::from_utf8_lossy(&r.value).parse().unwrap_or(0))
                .collect();
            assert!(vals.windows(2).all(|w| w[0] < w[1]), "{vals:?}");
        }
        // Group b is independent of a.
        assert_eq!(
            b.poll(1000, Duration::ZERO)
                .await
                .map(|v| v.len())
                .unwrap_or(0),
            100
        );
        assert_eq!(a.lag(), Some(100));
        a.commit(&crate::runtime::next_offsets(&got))
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(a.lag(), Some(0));
        // A new member of group a resumes after the commit: nothing to read.
        let mut a2 = log
            .subscribe("t", "a")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(a2
            .poll(10, Duration::ZERO)
            .await
            .unwrap_or_default()
            .is_empty());
    }

    #[tokio::test]
    async fn uncommitted_records_are_redelivered_to_a_new_member() {
        let log = MemLog::new(1, 1000);
        log.create_topic("t");
        let mut a = log
            .subscribe("t", "g")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        log.append("t", (0..10).map(|i| produce("k", i)).collect())
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let got = a.poll(4, Duration::ZERO).await.unwrap_or_default();
        a.commit(&crate::runtime::next_offsets(&got))
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let _not_committed = a.poll(4, Duration::ZERO).await.unwrap_or_default();
        drop(a);
        let mut b = log
            .subscribe("t", "g")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let again = b.poll(100, Duration::ZERO).await.unwrap_or_default();
        assert_eq!(again.first().map(|r| r.offset), Some(4));
        assert_eq!(again.len(), 6);
    }

    #[tokio::test]
    async fn append_waits_for_room_and_poll_wakes_on_append() {
        let log = Arc::new(MemLog::new(1, 5));
        log.create_topic("t");
        let mut c = log
            .subscribe("t", "g")
            .await
            .unwrap_or_else(|e| unreachable!("{e}"));
        let l2 = Arc::clone(&log);
        let producer = tokio::spawn(async move {
            l2.append("t", (0..20).map(|i| produce("k", i)).collect())
                .await
        });
        let mut seen = 0;
        while seen < 20 {
            let got = c.poll(3, Duration::from_secs(5)).await.unwrap_or_default();
            assert!(!got.is_empty(), "poll should wake on append");
            seen += got.len();
            c.commit(&crate::runtime::next_offsets(&got))
                .await
                .unwrap_or_else(|e| unreachable!("{e}"));
        }
        assert!(producer.await.is_ok());
        assert_eq!(c.lag(), Some(0));
    }
}
