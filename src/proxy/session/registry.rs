//! The statement registry's records: the client's named statements under their shared
//! server names, and what is still to be learnt of the Parses and Closes sent for them.
//! ([`Session`]'s methods that keep them are in `prepared.rs`.)

use super::*;

/// The client's named statements under their shared server names, and what is still to be
/// learnt of the Parses and Closes sent for them.
pub(super) struct Registry {
    /// Client name → statement.
    pub(super) statements: HashMap<String, Prepared>,
    /// The user's count of which server statements its clients hold.
    pub(super) book: Arc<Book>,
    /// The client's named Parses and Closes sent to the server and not yet answered: until
    /// their answers come, the proxy does not know whether the server ran them or skipped
    /// them after an error.
    pub(super) awaited: Vec<Awaited>,
    /// Statements left on the attached connection under a client's own name by a duplicate
    /// Parse ([`Session::parse_duplicate`]): closed before a message that names one reaches
    /// the server, which would otherwise find it.
    pub(super) placeholders: Vec<Placeholder>,
    /// Statements the unanswered sync groups made the connection prepare, with their group:
    /// if that group fails, they may not exist, and a later group that uses one prepares it
    /// again rather than trust a Parse that may be skipped.
    pub(super) group_prepared: Vec<GroupPrepared>,
    /// ParseCompletes owed to the client for Parses remembered without a server.
    pub(super) owed_parse_complete: u32,
}

impl Registry {
    pub(super) fn new(book: Arc<Book>) -> Registry {
        Registry {
            statements: HashMap::new(),
            book,
            awaited: Vec::new(),
            placeholders: Vec::new(),
            group_prepared: Vec::new(),
            owed_parse_complete: 0,
        }
    }
}

/// A named prepared statement as the client knows it.
pub(super) struct Prepared {
    /// The name it has on server connections: derived from its text, so that clients that
    /// prepare the same statement share it.
    pub(super) server_name: String,
    /// Its Parse message under that name, to prepare it on a server connection that lacks it.
    pub(super) parse: Bytes,
    /// It changes the session's settings (a SET, RESET, DISCARD ALL) when it is executed.
    pub(super) sets: bool,
}

/// A statement left on the attached connection under a client's own name by a duplicate
/// Parse.
pub(super) struct Placeholder {
    pub(super) name: String,
    /// The sync group of the Close sent for it, until that group is answered.
    pub(super) closing: Option<u64>,
}

/// A statement a sync group prepares on the attached connection, until the answer to its
/// Parse comes: if the group fails first, the connection may not have it.
pub(super) struct GroupPrepared {
    pub(super) group: u64,
    /// Its server name.
    pub(super) name: String,
    /// The position of its Parse among the Parse and Close answers.
    pub(super) at: u64,
}

/// A client's Parse or Close sent to the server whose answer has not come yet.
pub(super) struct Awaited {
    /// Its position among the Parse and Close answers ([`Replies::sent_theirs`]).
    pub(super) at: u64,
    /// The sync group it was sent in.
    pub(super) group: u64,
    /// The client's name of the statement.
    pub(super) name: String,
    /// For a Close: the statement, given back to the client if the Close did not run.
    pub(super) closed: Option<Prepared>,
    /// The Close was sent to the server under the statement's server name (its last holder
    /// closed it), and the connection's record no longer lists it: if the server skipped the
    /// Close, the connection still has the statement, and the record lists it again.
    pub(super) closed_on_server: bool,
}

/// What a Parse's statement does, as [`Session::parse_effects`] finds it.
pub(super) enum Effects {
    /// The Parse to handle in its place (LISTEN refused in transaction mode).
    Refused(Bytes),
    /// Whether the statement changes settings when it is executed.
    Sets(bool),
}

/// The name a statement gets on server connections: from its text and parameter types, so
/// the same statement is prepared once per server connection whichever client asks.
pub(super) fn statement_name(query: &[u8], param_types: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    // A cryptographic hash: a client must not be able to make its statement's name collide
    // with another client's.
    let mut hasher = Sha256::new();
    hasher.update((query.len() as u64).to_be_bytes());
    hasher.update(query);
    hasher.update(param_types);
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("switchyard_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_names_depend_on_text_and_types() {
        assert_eq!(
            statement_name(b"SELECT 1", &[0, 0]),
            statement_name(b"SELECT 1", &[0, 0])
        );
        assert_ne!(
            statement_name(b"SELECT 1", &[0, 0]),
            statement_name(b"SELECT 2", &[0, 0])
        );
        assert_ne!(
            statement_name(b"SELECT $1", &[0, 1, 0, 0, 0, 23]),
            statement_name(b"SELECT $1", &[0, 1, 0, 0, 0, 25])
        );
    }
}
