//! Named prepared statements on server connections. A client's statement is prepared on a
//! server connection under a name derived from its text ([`super::session`]), so a user's
//! clients that prepare the same text share it. Two things bound what stays on the server:
//!
//! - [`Book`]: per user, how many client statements (over all sessions) use each server
//!   name. When the last one is closed (protocol Close, `DEALLOCATE`, or its session ends),
//!   the statement is dead: the connection that runs the Close deallocates it at once, and
//!   every other connection that has it does so before its next transaction. (They were once
//!   never deallocated: a psycopg client with a statement cache of 10 that ran 2,000
//!   distinct statements left 2,001 on the server, visible to the next client.)
//! - [`OnConnection`]: per connection, at most `[proxy] max_prepared_statements`, the least
//!   recently used closed first to make room (as PgBouncer 1.21+ does); a client that uses
//!   one again has it prepared again, unseen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How many client statements use each server statement name, for one user's clients.
#[derive(Debug, Default)]
pub struct Book {
    holders: Mutex<HashMap<String, u32>>,
    /// Bumped whenever a statement loses its last holder: a connection that saw another
    /// count has dead statements to look for.
    deaths: AtomicU64,
}

impl Book {
    fn holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.holders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A client statement now uses `name`.
    pub fn hold(&self, name: &str) {
        *self.holders().entry(name.to_string()).or_default() += 1;
    }

    /// A client statement no longer uses `name`: true if no other does.
    pub fn release(&self, name: &str) -> bool {
        let mut holders = self.holders();
        let Some(count) = holders.get_mut(name) else {
            return true;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        holders.remove(name);
        self.deaths.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn deaths(&self) -> u64 {
        self.deaths.load(Ordering::Relaxed)
    }

    /// Of a connection's statements, those no client uses any more.
    pub fn dead(&self, on: &OnConnection) -> Vec<String> {
        let holders = self.holders();
        on.used
            .keys()
            .filter(|name| !holders.contains_key(*name))
            .cloned()
            .collect()
    }
}

/// The statements prepared on one server connection (server names), with when each was last
/// used, and at most `cap` of them.
#[derive(Debug)]
pub struct OnConnection {
    used: HashMap<String, u64>,
    clock: u64,
    cap: usize,
    /// [`Book::deaths`] when this connection's dead statements were last closed.
    pub seen_deaths: u64,
}

impl OnConnection {
    pub fn new(cap: usize) -> OnConnection {
        OnConnection {
            used: HashMap::new(),
            clock: 0,
            cap: cap.max(1),
            seen_deaths: 0,
        }
    }

    /// Whether the connection has `name`; a use makes it the most recently used.
    pub fn touch(&mut self, name: &str) -> bool {
        self.clock += 1;
        match self.used.get_mut(name) {
            Some(at) => {
                *at = self.clock;
                true
            }
            None => false,
        }
    }

    /// `name` is being prepared: returns the statement to close first to stay within the
    /// cap (the least recently used), if any.
    pub fn insert(&mut self, name: &str) -> Option<String> {
        self.clock += 1;
        if self.used.insert(name.to_string(), self.clock).is_some() {
            return None;
        }
        if self.used.len() <= self.cap {
            return None;
        }
        let oldest = self
            .used
            .iter()
            .filter(|(other, _)| *other != name)
            .min_by_key(|(_, at)| **at)
            .map(|(other, _)| other.clone())?;
        self.used.remove(&oldest);
        Some(oldest)
    }

    /// `name` turned out to be still there (a Close of it that the server skipped): listed
    /// again, without closing another. The cap may be passed by as many such statements until
    /// the connection closes, which is rare (a Close after an error in the same pipeline).
    pub fn restore(&mut self, name: &str) {
        self.clock += 1;
        self.used.insert(name.to_string(), self.clock);
    }

    /// Whether it was listed.
    pub fn remove(&mut self, name: &str) -> bool {
        self.used.remove(name).is_some()
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_dies_with_its_last_holder() {
        let book = Book::default();
        book.hold("a");
        book.hold("a");
        book.hold("b");
        let mut on = OnConnection::new(10);
        on.insert("a");
        on.insert("b");
        assert!(!book.release("a"));
        assert_eq!(book.deaths(), 0);
        assert!(book.release("a"));
        assert_eq!(book.deaths(), 1);
        assert_eq!(book.dead(&on), ["a"]);
    }

    #[test]
    fn a_statement_whose_close_was_skipped_is_listed_again() {
        let mut on = OnConnection::new(2);
        on.insert("a");
        on.insert("b");
        on.remove("a");
        on.restore("a");
        assert!(on.touch("a") && on.touch("b"));
        // Listed again without closing another.
        assert_eq!(on.len(), 2);
    }

    #[test]
    fn the_least_recently_used_makes_room() {
        let mut on = OnConnection::new(2);
        assert_eq!(on.insert("a"), None);
        assert_eq!(on.insert("b"), None);
        assert!(on.touch("a"));
        assert_eq!(on.insert("c"), Some("b".to_string()));
        assert!(!on.touch("b"));
        assert_eq!(on.len(), 2);
        // Preparing one it has already takes no room.
        assert_eq!(on.insert("a"), None);
    }
}
