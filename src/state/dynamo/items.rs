//! The table's items and every request made of them, each one DynamoDB call (or one
//! transaction). The rules of the lease are in `lease.rs`; this file knows the attributes.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, KeySchemaElement, KeyType,
    Put, ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TransactWriteItem,
};
use aws_sdk_dynamodb::Client;

use super::lease::Owned;
use super::{log_key, n, s};
use crate::pg::Side;
use crate::state::lock::{Holder, LockInfo};
use crate::state::{LogEntry, State, StateError, Switch};

pub const LOCK: &str = "lock";
pub const STATE: &str = "state";
pub const LOG_PREFIX: &str = "log#";
/// The key `plan` probes with: never written.
const PROBE: &str = "probe";

type Item = HashMap<String, AttributeValue>;

/// One migration's items in one table.
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    pub table: String,
    /// The migration's name: the partition key.
    pub pk: String,
    pub describe: String,
}

/// The lock item as read.
#[derive(Debug, Clone, PartialEq)]
pub struct LockItem {
    pub generation: u64,
    pub heartbeat: u64,
    /// Present while someone holds it.
    pub owner: Option<String>,
    pub holder: Option<Holder>,
}

impl LockItem {
    pub fn info(&self) -> LockInfo {
        LockInfo {
            held: self.owner.is_some(),
            holder: self.holder.clone(),
            generation: self.generation,
            heartbeat: self.heartbeat,
        }
    }

    /// How an error names it.
    pub fn named(&self) -> String {
        self.holder
            .as_ref()
            .map_or_else(|| "another coordinator".into(), |h| h.to_string())
    }

    fn from_item(item: &Item) -> LockItem {
        LockItem {
            generation: number(item, "generation"),
            heartbeat: number(item, "heartbeat"),
            owner: string(item, "owner"),
            holder: string(item, "holder").and_then(|h| serde_json::from_str(&h).ok()),
        }
    }
}

/// What a save writes, made by the store from the [`State`].
pub struct StateWrite {
    pub read_version: u64,
    pub body: String,
    pub log_start: usize,
    pub added: Vec<LogEntry>,
    pub log_len: usize,
    pub switch: Switch,
    /// The lock this process holds, which the transaction checks.
    pub holder: Option<Owned>,
}

/// How a conditional write ended.
pub enum Outcome {
    Done,
    /// The condition did not hold; the item as it is now, when the call returned it.
    Refused(Option<LockItem>),
}

impl Ctx {
    pub fn error(&self, action: &'static str, message: impl Into<String>) -> StateError {
        StateError::Store {
            store: self.describe.clone(),
            action,
            message: message.into(),
        }
    }

    fn sdk<E: std::error::Error + ProvideErrorMetadata + 'static>(
        &self,
        action: &'static str,
    ) -> impl FnOnce(SdkError<E>) -> StateError + '_ {
        move |e| self.error(action, self.explain(&e))
    }

    /// An SDK error as a sentence: the service's code and message, or why it was not reached.
    fn explain<E: std::error::Error + ProvideErrorMetadata + 'static>(
        &self,
        e: &SdkError<E>,
    ) -> String {
        match e {
            SdkError::ServiceError(service) => {
                let service = service.err();
                match service.code() {
                    Some("ResourceNotFoundException") => format!(
                        "table {} does not exist: create it with `switchyard state init PLAN`",
                        self.table
                    ),
                    Some(code) => format!("{code}: {}", service.message().unwrap_or_default()),
                    None => DisplayErrorContext(e).to_string(),
                }
            }
            SdkError::TimeoutError(_) => "no answer in time".into(),
            other => format!("cannot reach it: {}", DisplayErrorContext(other)),
        }
    }

    fn key(&self, sk: &str) -> Item {
        HashMap::from([("pk".to_string(), s(&self.pk)), ("sk".to_string(), s(sk))])
    }

    /// One item, read consistently; `projection` keeps only those attributes (names that
    /// DynamoDB reserves are written `#name` and mapped here).
    async fn get(
        &self,
        sk: &str,
        projection: Option<&str>,
        action: &'static str,
    ) -> Result<Option<Item>, StateError> {
        let mut request = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(sk)))
            .consistent_read(true);
        if let Some(projection) = projection {
            request = request.projection_expression(projection);
            for name in projection.split(", ").filter_map(|a| a.strip_prefix('#')) {
                request = request.expression_attribute_names(format!("#{name}"), name);
            }
        }
        let out = request.send().await.map_err(self.sdk(action))?;
        Ok(out.item)
    }

    pub async fn read_lock(&self) -> Result<Option<LockItem>, StateError> {
        let item = self.get(LOCK, None, "read the lock").await?;
        Ok(item.as_ref().map(LockItem::from_item))
    }

    /// The first holder ever: the item must not exist.
    pub async fn create_lock(&self, owner: &str, holder: &Holder) -> Result<Outcome, StateError> {
        let mut item = self.key(LOCK);
        item.insert("generation".into(), n(holder.generation));
        item.insert("heartbeat".into(), n(0));
        item.insert("owner".into(), s(owner));
        item.insert("holder".into(), s(holder_json(holder)));
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Outcome::Done),
            Err(e) if condition_failed(&e) => Ok(Outcome::Refused(None)),
            Err(e) => Err(self.sdk("take the lock")(e)),
        }
    }

    /// Takes the lock from what `seen` was, only if it is still exactly that (generation,
    /// heartbeat, owner): `holder.generation` must be `seen.generation + 1`. With
    /// `owner = None`, frees it instead (`state unlock --force`), still raising the
    /// generation so the holder it was taken from is fenced.
    pub async fn replace_lock(
        &self,
        seen: &LockItem,
        owner: Option<&str>,
        holder: &Holder,
    ) -> Result<Outcome, StateError> {
        let mut condition = "generation = :g AND heartbeat = :hb".to_string();
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(LOCK)))
            .expression_attribute_values(":g", n(seen.generation))
            .expression_attribute_values(":hb", n(seen.heartbeat))
            .expression_attribute_values(":next", n(holder.generation))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":holder", s(holder_json(holder)))
            .expression_attribute_names("#owner", "owner")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        match &seen.owner {
            Some(previous) => {
                condition.push_str(" AND #owner = :previous");
                request = request.expression_attribute_values(":previous", s(previous));
            }
            None => condition.push_str(" AND attribute_not_exists(#owner)"),
        }
        request = match owner {
            Some(owner) => request
                .update_expression(
                    "SET generation = :next, heartbeat = :zero, #owner = :owner, holder = :holder",
                )
                .expression_attribute_values(":owner", s(owner)),
            None => request.update_expression(
                "SET generation = :next, heartbeat = :zero, holder = :holder REMOVE #owner",
            ),
        };
        let request = request.condition_expression(condition);
        self.conditional_update(request, "take the lock").await
    }

    /// A heartbeat: raises the counter if the lock is still this holder's.
    pub async fn renew(&self, owned: &Owned) -> Result<Outcome, StateError> {
        let request = self
            .owned_update(owned)
            .update_expression("SET heartbeat = heartbeat + :one")
            .expression_attribute_values(":one", n(1))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        self.conditional_update(request, "renew the lock").await
    }

    /// Lets the lock go, if it is still this holder's. The generation stays: the next holder
    /// raises it.
    pub async fn release(&self, owned: &Owned) -> Result<Outcome, StateError> {
        let request = self.owned_update(owned).update_expression("REMOVE #owner");
        self.conditional_update(request, "release the lock").await
    }

    /// An update of the lock item that holds only while it is still `owned`'s.
    fn owned_update(&self, owned: &Owned) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(LOCK)))
            .condition_expression("#owner = :owner AND generation = :g")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(&owned.owner))
            .expression_attribute_values(":g", n(owned.generation))
    }

    async fn conditional_update(
        &self,
        request: UpdateItemFluentBuilder,
        action: &'static str,
    ) -> Result<Outcome, StateError> {
        match request.send().await {
            Ok(_) => Ok(Outcome::Done),
            Err(e) => match e.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(refused)) => {
                    Ok(Outcome::Refused(refused.item().map(LockItem::from_item)))
                }
                _ => Err(self.sdk(action)(e)),
            },
        }
    }

    /// The state item and its log, or `None`.
    pub async fn load(&self) -> Result<Option<State>, StateError> {
        let Some(item) = self.get(STATE, None, "read the state").await? else {
            return Ok(None);
        };
        let body = string(&item, "body").unwrap_or_default();
        let mut state: State = serde_json::from_str(&body)
            .map_err(|e| self.error("read the state", format!("the state item is damaged: {e}")))?;
        state.version = number(&item, "version");
        let log_len = number(&item, "log_len") as usize;
        state.log = self.read_log(log_len).await?;
        Ok(Some(state))
    }

    /// The first `len` log entries, in order. Entries past them (none, since a save writes
    /// them in the same transaction as the state) are not read.
    async fn read_log(&self, len: usize) -> Result<Vec<LogEntry>, StateError> {
        let mut entries = Vec::with_capacity(len);
        if len == 0 {
            return Ok(entries);
        }
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :first AND :last")
                .expression_attribute_values(":pk", s(&self.pk))
                .expression_attribute_values(":first", s(log_key(0)))
                .expression_attribute_values(":last", s(log_key(len - 1)))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(self.sdk("read the state's log"))?;
            for item in out.items() {
                let text = string(item, "entry").unwrap_or_default();
                let entry = serde_json::from_str(&text).map_err(|e| {
                    self.error(
                        "read the state's log",
                        format!("a log item is damaged: {e}"),
                    )
                })?;
                entries.push(entry);
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        if entries.len() != len {
            return Err(self.error(
                "read the state's log",
                format!(
                    "the state has {len} log entries, the table {}",
                    entries.len()
                ),
            ));
        }
        Ok(entries)
    }

    pub async fn stored_log_len(&self) -> Result<usize, StateError> {
        let item = self.get(STATE, Some("log_len"), "read the state").await?;
        Ok(item.map_or(0, |item| number(&item, "log_len") as usize))
    }

    pub async fn read_switch(&self) -> Result<Option<Switch>, StateError> {
        let item = self
            .get(STATE, Some("#backend, epoch"), "read the switch")
            .await?;
        Ok(item.map(|item| Switch {
            backend: if string(&item, "backend").as_deref() == Some("target") {
                Side::Target
            } else {
                Side::Source
            },
            epoch: number(&item, "epoch"),
        }))
    }

    /// One transaction: the lock is still this holder's (or free, for a command that holds
    /// none), the state is still the version it read, and the new log entries.
    pub async fn save(&self, write: StateWrite) -> Result<(), StateError> {
        let build =
            |e: aws_sdk_dynamodb::error::BuildError| self.error("save the state", e.to_string());
        let mut check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(LOCK)))
            .expression_attribute_names("#owner", "owner")
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        check = match &write.holder {
            Some(owned) => check
                .condition_expression("#owner = :owner AND generation = :g")
                .expression_attribute_values(":owner", s(&owned.owner))
                .expression_attribute_values(":g", n(owned.generation)),
            None => check.condition_expression("attribute_not_exists(#owner)"),
        };
        let mut item = self.key(STATE);
        item.insert("body".into(), s(&write.body));
        item.insert("version".into(), n(write.read_version + 1));
        item.insert("log_len".into(), n(write.log_len));
        item.insert("backend".into(), s(write.switch.backend.to_string()));
        item.insert("epoch".into(), n(write.switch.epoch));
        let mut put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        put = if write.read_version == 0 {
            put.condition_expression("attribute_not_exists(pk)")
        } else {
            put.condition_expression("version = :v")
                .expression_attribute_values(":v", n(write.read_version))
        };
        let mut transaction = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(check.build().map_err(build)?)
                    .build(),
            )
            .transact_items(
                TransactWriteItem::builder()
                    .put(put.build().map_err(build)?)
                    .build(),
            );
        for (offset, entry) in write.added.iter().enumerate() {
            let mut item = self.key(&log_key(write.log_start + offset));
            let text = serde_json::to_string(entry)
                .map_err(|e| self.error("save the state", e.to_string()))?;
            item.insert("entry".into(), s(text));
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .build()
                .map_err(build)?;
            transaction = transaction.transact_items(TransactWriteItem::builder().put(put).build());
        }
        let Err(e) = transaction.send().await else {
            return Ok(());
        };
        let Some(TransactWriteItemsError::TransactionCanceledException(canceled)) =
            e.as_service_error()
        else {
            return Err(self.sdk("save the state")(e));
        };
        let reasons = canceled.cancellation_reasons();
        let failed = |i: usize| {
            reasons
                .get(i)
                .and_then(|r| r.code())
                .is_some_and(|code| code == "ConditionalCheckFailed")
        };
        if failed(0) {
            // The lock is someone else's: name them, from the same answer if it came along.
            let now = match reasons[0].item() {
                Some(item) => Some(LockItem::from_item(item)),
                None => self.read_lock().await.ok().flatten(),
            };
            return Err(StateError::LostLock {
                store: self.describe.clone(),
                holder: now.map_or_else(|| "another coordinator".into(), |l| l.named()),
            });
        }
        if failed(1) {
            let found = match reasons[1].item() {
                Some(item) => number(item, "version"),
                None => self.stored_version().await.unwrap_or_default(),
            };
            return Err(StateError::Conflict {
                path: self.describe.clone(),
                read: write.read_version,
                found,
            });
        }
        Err(self.error(
            "save the state",
            format!("the transaction was cancelled: {}", DisplayErrorContext(&e)),
        ))
    }

    async fn stored_version(&self) -> Result<u64, StateError> {
        let item = self.get(STATE, Some("version"), "read the state").await?;
        Ok(item.map_or(0, |item| number(&item, "version")))
    }

    /// `switchyard state init`: `true` if it created the table, `false` if it was there.
    pub async fn create_table(&self) -> Result<bool, StateError> {
        let build =
            |e: aws_sdk_dynamodb::error::BuildError| self.error("create the table", e.to_string());
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)
        };
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(build)
        };
        // A table takes a while to make (DynamoDB Local's first one, on a cold JVM, too):
        // a call that timed out is asked again; one that landed says the table is in use.
        let mut tries = 0;
        let created = loop {
            tries += 1;
            let sent = self
                .client
                .create_table()
                .table_name(&self.table)
                .attribute_definitions(attribute("pk")?)
                .attribute_definitions(attribute("sk")?)
                .key_schema(key("pk", KeyType::Hash)?)
                .key_schema(key("sk", KeyType::Range)?)
                .billing_mode(BillingMode::PayPerRequest)
                .send()
                .await;
            match sent {
                Err(SdkError::TimeoutError(_)) if tries < 5 => continue,
                other => break other,
            }
        };
        let fresh = match created {
            Ok(_) => true,
            Err(e) if e.code() == Some("ResourceInUseException") => false,
            Err(e) => return Err(self.sdk("create the table")(e)),
        };
        for _ in 0..300 {
            let described = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(self.sdk("describe the table"))?;
            if described.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(fresh);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(self.error("create the table", "it did not become active within 60s"))
    }

    /// Each action the store uses, tried so that nothing changes: writes conditioned on an
    /// item that does not exist. A refused condition means the action is allowed.
    pub async fn probe(&self) -> Vec<(&'static str, Option<String>)> {
        let problem = |e: &dyn ProvideErrorMetadata, display: String| -> Option<String> {
            match e.code() {
                Some("ConditionalCheckFailedException" | "TransactionCanceledException") => None,
                _ => Some(display),
            }
        };
        let mut found = Vec::new();
        let described = self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await;
        found.push((
            "dynamodb:DescribeTable",
            described.err().and_then(|e| problem(&e, self.explain(&e))),
        ));
        let get = self.get(PROBE, None, "read").await;
        found.push(("dynamodb:GetItem", get.err().map(|e| e.to_string())));
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(&self.pk))
            .limit(1)
            .consistent_read(true)
            .send()
            .await;
        found.push((
            "dynamodb:Query",
            query.err().and_then(|e| problem(&e, self.explain(&e))),
        ));
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.key(PROBE)))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await;
        found.push((
            "dynamodb:PutItem",
            put.err().and_then(|e| problem(&e, self.explain(&e))),
        ));
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(PROBE)))
            .update_expression("SET heartbeat = :one")
            .expression_attribute_values(":one", n(1))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await;
        found.push((
            "dynamodb:UpdateItem",
            update.err().and_then(|e| problem(&e, self.explain(&e))),
        ));
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(PROBE)))
            .condition_expression("attribute_exists(pk)")
            .build();
        let transaction = match check {
            Ok(check) => self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().condition_check(check).build())
                .send()
                .await
                .err()
                .and_then(|e| problem(&e, self.explain(&e))),
            Err(e) => Some(e.to_string()),
        };
        found.push(("dynamodb:TransactWriteItems", transaction));
        found
    }
}

fn condition_failed<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    e.as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}

fn holder_json(holder: &Holder) -> String {
    serde_json::to_string(holder).unwrap_or_default()
}

fn string(item: &Item, name: &str) -> Option<String> {
    match item.get(name) {
        Some(AttributeValue::S(text)) => Some(text.clone()),
        _ => None,
    }
}

fn number(item: &Item, name: &str) -> u64 {
    match item.get(name) {
        Some(AttributeValue::N(text)) => text.parse().unwrap_or(0),
        _ => 0,
    }
}
