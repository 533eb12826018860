//! Message types and the other one-byte codes of the protocol, by name ("Message Formats" in
//! the PostgreSQL documentation). Constants, not an enum: the session matches on the byte it
//! read, and a constant in a pattern costs nothing on the hot path. The backend's come from
//! `postgres-protocol`; the frontend's (which it does not export) are here.
//!
//! Several bytes mean one thing from the client and another from the server (`E`: Execute /
//! ErrorResponse, `D`: Describe / DataRow, `C`: Close / CommandComplete, `S`: Sync /
//! ParameterStatus): the names say which.

pub use postgres_protocol::message::backend::{
    BIND_COMPLETE_TAG as BIND_COMPLETE, CLOSE_COMPLETE_TAG as CLOSE_COMPLETE,
    COMMAND_COMPLETE_TAG as COMMAND_COMPLETE, COPY_IN_RESPONSE_TAG as COPY_IN_RESPONSE,
    DATA_ROW_TAG as DATA_ROW, EMPTY_QUERY_RESPONSE_TAG as EMPTY_QUERY_RESPONSE,
    ERROR_RESPONSE_TAG as ERROR_RESPONSE, NOTICE_RESPONSE_TAG as NOTICE_RESPONSE,
    NO_DATA_TAG as NO_DATA, PARAMETER_STATUS_TAG as PARAMETER_STATUS,
    PARSE_COMPLETE_TAG as PARSE_COMPLETE, READY_FOR_QUERY_TAG as READY_FOR_QUERY,
    ROW_DESCRIPTION_TAG as ROW_DESCRIPTION,
};

// The frontend's messages.
pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
/// PasswordMessage, SASLInitialResponse and SASLResponse share it.
pub const PASSWORD_MESSAGE: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

// What a Describe or Close names.
pub const STATEMENT: u8 = b'S';
pub const PORTAL: u8 = b'P';

// ReadyForQuery's transaction status.
pub const IDLE: u8 = b'I';
pub const IN_TRANSACTION: u8 = b'T';
pub const FAILED_TRANSACTION: u8 = b'E';
